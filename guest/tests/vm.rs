//! hangar-guest end to end, in a real VM: QEMU microvm under TCG (VMM.md's command line) on
//! the image of `ops/build-guest-image.sh`, talking over the `agent0` port's unix socket.
//!
//! Without the image (`$HANGAR_IMAGE_DIR` or `<repo>/.hangar/image`) or `qemu-system-x86_64`
//! the test says why and passes, unless `HANGAR_REQUIRE_VM=1`. It prints its measurements;
//! see them with `cargo test -p hangar-guest --test vm -- --nocapture`.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hangar_guest::protocol::{
    self, ErrorCode, ExecRequest, ExecResult, Request, RequestFrame, Response, ResponseFrame,
};

fn image_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("HANGAR_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.hangar/image"));
    let missing: Vec<String> = ["vmlinux", "initramfs.cpio.gz", "base.qcow2"]
        .iter()
        .map(|f| dir.join(f))
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    let qemu_ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let why = if !qemu_ok {
        "qemu-system-x86_64 is not installed".to_owned()
    } else if !missing.is_empty() {
        format!(
            "guest image missing ({}): run ops/build-guest-image.sh",
            missing.join(", ")
        )
    } else {
        return Some(std::path::absolute(dir).unwrap());
    };
    if std::env::var("HANGAR_REQUIRE_VM").is_ok_and(|v| v == "1") {
        panic!("HANGAR_REQUIRE_VM=1 but {why}");
    }
    eprintln!("skipping VM test: {why}");
    None
}

/// A booted VM; dropping it kills QEMU and removes its files.
struct Vm {
    qemu: Child,
    dir: tempfile::TempDir,
    spawned: Instant,
}

impl Vm {
    fn boot(image: &Path) -> Vm {
        let dir = tempfile::Builder::new()
            .prefix("hangar-guest-vm")
            .tempdir()
            .unwrap();
        let overlay = dir.path().join("overlay.qcow2");
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(image.join("base.qcow2"))
            .arg(&overlay)
            .status()
            .unwrap();
        assert!(status.success(), "qemu-img create failed");
        let p = |f: &str| dir.path().join(f).display().to_string();
        let img = |f: &str| image.join(f).display().to_string();
        // VMM.md's microvm TCG command line. No -no-reboot: a TCG microvm often resets once
        // before the kernel starts.
        let spawned = Instant::now();
        let qemu = Command::new("qemu-system-x86_64")
            .args(["-M", "microvm", "-accel", "tcg", "-m", "128", "-smp", "1"])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args([
                "-kernel",
                &img("vmlinux"),
                "-initrd",
                &img("initramfs.cpio.gz"),
            ])
            .args([
                "-append",
                "console=ttyS0 reboot=t panic=-1 quiet tsc_early_khz=2000000 no_timer_check",
            ])
            .args(["-serial", &format!("file:{}", p("console.log"))])
            .args([
                "-drive",
                &format!(
                    "file={},format=qcow2,if=none,id=disk0,cache=writeback",
                    p("overlay.qcow2")
                ),
            ])
            .args(["-device", "virtio-blk-device,drive=disk0"])
            .args(["-device", "virtio-serial-device"])
            .args([
                "-chardev",
                &format!(
                    "socket,id=agent,path={},server=on,wait=off",
                    p("agent.sock")
                ),
            ])
            .args(["-device", "virtserialport,chardev=agent,name=agent0"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn qemu-system-x86_64");
        Vm { qemu, dir, spawned }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("console.log"));
            eprintln!("--- guest console ---\n{}", log.unwrap_or_default());
        }
    }
}

/// A blocking host side of the protocol (the real one is agent/src/driver/qemu/guest.rs).
struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
    next_id: u64,
}

impl Client {
    /// Connects and says Hello (again every 200 ms) until Ready; returns the boot id too.
    fn connect(socket: &Path, deadline: Instant) -> (Client, String) {
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => panic!("connect: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        // Random-ish ids per connection, as the real host does.
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let mut client = Client {
            stream,
            buf: Vec::new(),
            next_id: (nanos.as_nanos() as u64 & 0xffff_ffff) << 16,
        };
        let first = client.next_id;
        loop {
            assert!(Instant::now() < deadline, "no Ready before the deadline");
            let id = client.send(&Request::Hello {
                version: protocol::VERSION,
            });
            let attempt = Instant::now() + Duration::from_millis(200);
            if let Some(frame) = client.read_frame(attempt) {
                assert!(
                    frame.id >= first && frame.id <= id,
                    "unknown id {}",
                    frame.id
                );
                match frame.response {
                    Response::Ready { version, boot_id } => {
                        assert_eq!(version, protocol::VERSION);
                        return (client, boot_id);
                    }
                    other => panic!("expected ready, got {other:?}"),
                }
            }
        }
    }

    fn send(&mut self, request: &Request) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let frame = RequestFrame {
            id,
            request: request.clone(),
        };
        self.stream
            .write_all(&protocol::encode(&frame).unwrap())
            .unwrap();
        id
    }

    /// The next frame, or `None` at `until`.
    fn read_frame(&mut self, until: Instant) -> Option<ResponseFrame> {
        loop {
            if let Some(frame) = protocol::decode(&mut self.buf).unwrap() {
                return Some(frame);
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("guest socket closed"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    fn call(&mut self, request: &Request) -> Response {
        let id = self.send(request);
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let frame = self.read_frame(until).expect("no response in 30 s");
            if frame.id == id {
                return frame.response;
            }
        }
    }

    fn exec(&mut self, argv: &[&str], timeout_ms: u64, max_output_bytes: u64) -> ExecResult {
        let request = Request::Exec(ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            cwd: None,
            stdin: Vec::new(),
            timeout_ms,
            max_output_bytes,
        });
        match self.call(&request) {
            Response::Exec(r) => r,
            other => panic!("exec {argv:?}: {other:?}"),
        }
    }

    /// utime + stime of the guest agent (the exec'd shell's parent), in clock ticks.
    fn agent_cpu_ticks(&mut self) -> u64 {
        let r = self.exec(&["sh", "-c", "cat /proc/$PPID/stat"], 5000, 4096);
        let stat = String::from_utf8(r.stdout).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
        // Fields 14 and 15 of proc(5); the slice starts at field 3.
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }
}

fn host_cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn guest_agent_in_a_real_vm() {
    let Some(image) = image_dir() else { return };
    let vm = Vm::boot(&image);
    let deadline = vm.spawned + Duration::from_secs(60);
    let (mut c, boot_id) = Client::connect(&vm.socket(), deadline);
    let boot = vm.spawned.elapsed();
    assert_eq!(boot_id.len(), 36, "boot id {boot_id:?}");

    let r = c.exec(&["echo", "hi"], 5000, 1024);
    assert_eq!((r.stdout.as_slice(), r.exit_code), (&b"hi\n"[..], 0));

    let r = c.exec(&["sleep", "10"], 500, 1024);
    assert!(r.timed_out, "{r:?}");
    assert_eq!(r.exit_code, 128 + 9);
    assert!(r.duration_ms < 5000, "{r:?}");

    let r = c.exec(&["sh", "-c", "head -c 100000 /dev/zero"], 5000, 100);
    assert_eq!(r.stdout, vec![0u8; 100]);
    assert!(r.stdout_truncated && !r.stderr_truncated);

    match c.call(&Request::Exec(ExecRequest {
        argv: vec!["no-such-program".into()],
        env: Vec::new(),
        cwd: None,
        stdin: Vec::new(),
        timeout_ms: 1000,
        max_output_bytes: 10,
    })) {
        Response::Error { code, .. } => assert_eq!(code, ErrorCode::NotFound),
        other => panic!("{other:?}"),
    }

    // Files under /data, the disk (the init script mounts /dev/vda there).
    let write = Request::WriteFile {
        path: "/data/sub/f".into(),
        data: b"hello disk".to_vec(),
        mode: Some(0o600),
    };
    assert_eq!(c.call(&write), Response::FileWritten { bytes: 10 });
    let read = |max_bytes| Request::ReadFile {
        path: "/data/sub/f".into(),
        max_bytes,
    };
    assert_eq!(
        c.call(&read(100)),
        Response::File {
            data: b"hello disk".to_vec(),
            truncated: false
        }
    );
    assert_eq!(
        c.call(&read(5)),
        Response::File {
            data: b"hello".to_vec(),
            truncated: true
        }
    );
    let r = c.exec(
        &[
            "sh",
            "-c",
            "stat -c %a /data/sub/f; grep ' /data ' /proc/mounts",
        ],
        5000,
        1024,
    );
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.starts_with("600\n/dev/vda /data ext4 "), "{out}");

    // A malformed frame with an id is answered; the conversation goes on.
    let garbage = protocol::encode(&serde_json::json!({"id": 7, "type": "reboot"})).unwrap();
    c.stream.write_all(&garbage).unwrap();
    let frame = c.read_frame(Instant::now() + Duration::from_secs(10));
    match frame.map(|f| (f.id, f.response)) {
        Some((7, Response::Error { code, .. })) => assert_eq!(code, ErrorCode::Invalid),
        other => panic!("{other:?}"),
    }

    // Idle CPU of the guest agent while a host is connected and silent.
    let qemu_pid = vm.qemu.id();
    let (before, host_before) = (c.agent_cpu_ticks(), host_cpu_ticks(qemu_pid));
    std::thread::sleep(Duration::from_secs(3));
    let (after, host_after) = (c.agent_cpu_ticks(), host_cpu_ticks(qemu_pid));
    let idle_connected = after - before;
    let qemu_idle = host_after - host_before;

    // Disconnect in the middle of a frame, stay away 3 s, come back: the partial frame is
    // discarded and the guest answers a new Hello.
    let away_before = c.agent_cpu_ticks();
    c.stream.write_all(&[0, 0, 0, 50, b'{']).unwrap();
    drop(c);
    std::thread::sleep(Duration::from_secs(3));
    let reconnect_at = Instant::now();
    let (mut c, boot_id_again) =
        Client::connect(&vm.socket(), Instant::now() + Duration::from_secs(30));
    let reconnect = reconnect_at.elapsed();
    assert_eq!(boot_id_again, boot_id, "same boot, same id");
    let idle_away = c.agent_cpu_ticks() - away_before;
    assert_eq!(c.exec(&["echo", "back"], 5000, 100).stdout, b"back\n");
    // A quick reconnect too.
    drop(c);
    let (mut c, _) = Client::connect(&vm.socket(), Instant::now() + Duration::from_secs(30));
    assert_eq!(
        c.exec(&["cat", "/data/sub/f"], 5000, 100).stdout,
        b"hello disk"
    );

    // Exec round trips.
    let mut rtts: Vec<Duration> = (0..50)
        .map(|_| {
            let t = Instant::now();
            assert_eq!(c.exec(&["true"], 5000, 100).exit_code, 0);
            t.elapsed()
        })
        .collect();
    rtts.sort();

    // USER_HZ is 100 in both the guest and the host.
    eprintln!("measured (TCG, 128 MiB, 1 vCPU):");
    eprintln!("  spawn -> Ready: {} ms", boot.as_millis());
    eprintln!(
        "  exec `true` round trip over 50: p50 {:.1} ms, min {:.1} ms, max {:.1} ms",
        rtts[25].as_secs_f64() * 1e3,
        rtts[0].as_secs_f64() * 1e3,
        rtts[49].as_secs_f64() * 1e3
    );
    eprintln!(
        "  guest agent CPU over 3 s idle: {} ticks connected ({:.1} %), {} ticks with no host \
         connected (3 s away + reconnect)",
        idle_connected,
        idle_connected as f64 / 3.0,
        idle_away
    );
    eprintln!(
        "  QEMU process CPU over the same 3 s idle: {:.1} % of a host core",
        qemu_idle as f64 / 3.0
    );
    eprintln!(
        "  reconnect after 3 s away -> Ready: {} ms",
        reconnect.as_millis()
    );
    assert!(idle_connected <= 3, "the agent should sleep while idle");
}
