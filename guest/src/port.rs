//! The virtio-serial port: finding it, and the read/answer loop over it.
//!
//! The port has no "accept": while no host is connected to QEMU's socket, `poll()` reports
//! POLLHUP at once and `read()` returns 0, so the only way to wait for a host is to retry.
//! Retries back off from 50 ms to 1 s (a tight loop cost ~18 % of a core under TCG, VMM.md);
//! once a host is connected the loop blocks in `poll()` without a timeout.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::serve;

const AWAY_MIN: Duration = Duration::from_millis(50);
const AWAY_MAX: Duration = Duration::from_secs(1);
/// A partial frame that gets no more bytes for this long is dropped: the host that sent it
/// went away (and maybe came back) without us seeing the end-of-file in between.
const STALE_PARTIAL: Duration = Duration::from_secs(2);
/// A response the host does not read for this long is dropped.
const WRITE_STALL: Duration = Duration::from_secs(30);

/// `/dev/vportNpM` of the port called `name`, waiting for the driver to create it.
pub fn find(name: &str) -> PathBuf {
    let mut waited = Duration::ZERO;
    loop {
        if let Some(path) = lookup(Path::new("/sys/class/virtio-ports"), name) {
            return path;
        }
        if waited == Duration::from_secs(5) {
            eprintln!("hangar-guest: still no virtio port named {name}");
        }
        std::thread::sleep(Duration::from_millis(100));
        waited += Duration::from_millis(100);
    }
}

fn lookup(class: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(class).ok()?.flatten() {
        let found = std::fs::read_to_string(entry.path().join("name"));
        if found.is_ok_and(|n| n.trim() == name) {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    None
}

/// Opens the port once, read-write and non-blocking (a blocking write would hang until a
/// host connects). Retries while the device node is not there yet or still busy.
pub fn open(path: &Path) -> File {
    loop {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(OFlag::O_NONBLOCK.bits())
            .open(path)
        {
            Ok(file) => return file,
            Err(e) => {
                eprintln!("hangar-guest: open {}: {e}; retrying", path.display());
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// Serves requests on `port` forever, one at a time, in order.
pub fn serve(port: &File, boot_id: &str) -> ! {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 256 * 1024];
    let mut away = AWAY_MIN;
    let mut last_bytes = Instant::now();
    loop {
        while let Some(incoming) = serve::next_frame(&mut buf) {
            if let serve::Incoming::Dropped(why) = &incoming {
                eprintln!("hangar-guest: {why}");
            }
            if let Some(bytes) = serve::handle(boot_id, incoming)
                && let Err(e) = write_all(port, &bytes)
            {
                eprintln!("hangar-guest: response dropped: {e}");
            }
        }
        // Idle with nothing pending: sleep in poll until the host writes or leaves.
        let timeout = if buf.is_empty() {
            PollTimeout::NONE
        } else {
            PollTimeout::from(1000u16)
        };
        let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => {
                if last_bytes.elapsed() >= STALE_PARTIAL {
                    eprintln!("hangar-guest: dropping a stale partial frame");
                    buf.clear();
                }
                continue;
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                eprintln!("hangar-guest: poll: {e}");
                std::thread::sleep(AWAY_MAX);
                continue;
            }
        }
        match (&*port).read(&mut chunk) {
            Ok(0) => {
                // No host: whatever was half-received belongs to a connection that is gone.
                buf.clear();
                std::thread::sleep(away);
                away = (away * 2).min(AWAY_MAX);
            }
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                away = AWAY_MIN;
                last_bytes = Instant::now();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => {
                eprintln!("hangar-guest: read: {e}");
                buf.clear();
                std::thread::sleep(AWAY_MAX);
            }
        }
    }
}

/// Writes a whole response, waiting in poll() while the host's side is full. Gives up when
/// the host disconnects (it will say Hello again) or stops reading.
pub fn write_all(port: &File, mut bytes: &[u8]) -> io::Result<()> {
    let mut progress = Instant::now();
    while !bytes.is_empty() {
        match (&*port).write(bytes) {
            Ok(n) => {
                bytes = &bytes[n..];
                progress = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if progress.elapsed() >= WRITE_STALL {
                    return Err(io::Error::new(ErrorKind::TimedOut, "host stopped reading"));
                }
                let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLOUT)];
                match poll(&mut fds, PollTimeout::from(1000u16)) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
                let revents = fds[0].revents().unwrap_or(PollFlags::empty());
                if revents.contains(PollFlags::POLLHUP) && !revents.contains(PollFlags::POLLOUT) {
                    return Err(io::Error::new(ErrorKind::NotConnected, "host disconnected"));
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_port_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for (port, name) in [("vport0p1", "other"), ("vport1p1", "agent0")] {
            std::fs::create_dir(dir.path().join(port)).unwrap();
            std::fs::write(dir.path().join(port).join("name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(
            lookup(dir.path(), "agent0"),
            Some(PathBuf::from("/dev/vport1p1"))
        );
        assert_eq!(lookup(dir.path(), "agent9"), None);
    }
}
