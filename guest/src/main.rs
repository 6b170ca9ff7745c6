//! `hangar-guest`: the agent inside a capsule's VM. It serves the host agent's requests
//! (`hangar_guest::protocol`) on the virtio-serial port `agent0`, one at a time, forever;
//! the initramfs's /init restarts it if it ever exits.

mod exec;
mod files;
mod port;
mod serve;

use std::io::{self, ErrorKind};

use hangar_guest::protocol::{ErrorCode, PORT_NAME, Response};

fn main() {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| {
            eprintln!("hangar-guest: no boot id: {e}");
            "unknown".to_owned()
        });
    let path = port::find(PORT_NAME);
    let file = port::open(&path);
    eprintln!("hangar-guest: serving on {}", path.display());
    port::serve(&file, &boot_id);
}

pub(crate) fn error_response(code: ErrorCode, message: String) -> Response {
    Response::Error { code, message }
}

/// An OS error as the protocol's error code, with what was being done.
pub(crate) fn io_error_response(e: &io::Error, context: &str) -> Response {
    let code = match e.kind() {
        ErrorKind::NotFound => ErrorCode::NotFound,
        ErrorKind::PermissionDenied => ErrorCode::Denied,
        ErrorKind::InvalidInput => ErrorCode::Invalid,
        _ => ErrorCode::Io,
    };
    error_response(code, format!("{context}: {e}"))
}
