//! `WriteFile` and `ReadFile`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use hangar_guest::protocol::{ErrorCode, MAX_FRAME, Response};

use crate::{error_response, io_error_response};

/// File bytes one response can carry: base64 of it must fit in a frame.
pub const READ_CAP: u64 = (MAX_FRAME / 4 * 3 - 64 * 1024) as u64;

/// Writes `data` to `path` whole or not at all: a temp file in the same directory, renamed
/// over the target (readers never see half a file). Missing parent directories are created.
pub fn write(path: &str, data: &[u8], mode: Option<u32>) -> Response {
    let mode = mode.unwrap_or(0o644);
    if mode > 0o7777 {
        return error_response(ErrorCode::Invalid, format!("mode {mode:o} out of range"));
    }
    let target = Path::new(path);
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
        return error_response(ErrorCode::Invalid, format!("{path}: not a file path"));
    };
    if !target.is_absolute() {
        return error_response(ErrorCode::Invalid, format!("{path}: not an absolute path"));
    }
    if let Err(e) = fs::create_dir_all(parent) {
        return io_error_response(&e, &format!("create {}", parent.display()));
    }
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let temp = parent.join(format!(
        ".{}.hangar-tmp.{}.{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)?;
        file.write_all(data)?;
        // The umask applied at open; the caller asked for exactly `mode`.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        fs::rename(&temp, target)
    })();
    match result {
        Ok(()) => Response::FileWritten {
            bytes: data.len() as u64,
        },
        Err(e) => {
            let _ = fs::remove_file(&temp);
            io_error_response(&e, &format!("write {path}"))
        }
    }
}

/// Reads at most `max_bytes` (and at most [`READ_CAP`]) of `path`.
pub fn read(path: &str, max_bytes: u64) -> Response {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return io_error_response(&e, &format!("open {path}")),
    };
    match file.metadata() {
        Ok(m) if m.is_dir() => {
            return error_response(ErrorCode::Invalid, format!("{path} is a directory"));
        }
        Ok(_) => {}
        Err(e) => return io_error_response(&e, &format!("stat {path}")),
    }
    let limit = max_bytes.min(READ_CAP);
    let mut data = Vec::new();
    // One byte past the limit tells whether the file was longer.
    match file.take(limit + 1).read_to_end(&mut data) {
        Ok(_) => {
            let truncated = data.len() as u64 > limit;
            data.truncate(limit as usize);
            Response::File { data, truncated }
        }
        Err(e) => io_error_response(&e, &format!("read {path}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(resp: Response) -> ErrorCode {
        match resp {
            Response::Error { code, .. } => code,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn write_creates_parents_sets_mode_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/f.txt");
        let p = path.to_str().unwrap();
        assert_eq!(write(p, b"one", None), Response::FileWritten { bytes: 3 });
        assert_eq!(fs::read(&path).unwrap(), b"one");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o644);
        assert_eq!(
            write(p, b"second", Some(0o600)),
            Response::FileWritten { bytes: 6 }
        );
        assert_eq!(fs::read(&path).unwrap(), b"second");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn write_rejects_bad_requests() {
        assert_eq!(code(write("relative/f", b"x", None)), ErrorCode::Invalid);
        assert_eq!(code(write("/", b"x", None)), ErrorCode::Invalid);
        assert_eq!(
            code(write("/tmp/x", b"x", Some(0o100000))),
            ErrorCode::Invalid
        );
        let dir = tempfile::tempdir().unwrap();
        // A parent that is a file.
        let file = dir.path().join("file");
        fs::write(&file, b"").unwrap();
        let under = file.join("f");
        assert_eq!(
            code(write(under.to_str().unwrap(), b"x", None)),
            ErrorCode::Io
        );
    }

    #[test]
    fn read_limits_and_reports_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"hello world").unwrap();
        let p = path.to_str().unwrap();
        assert_eq!(
            read(p, 100),
            Response::File {
                data: b"hello world".to_vec(),
                truncated: false
            }
        );
        assert_eq!(
            read(p, 11),
            Response::File {
                data: b"hello world".to_vec(),
                truncated: false
            }
        );
        assert_eq!(
            read(p, 5),
            Response::File {
                data: b"hello".to_vec(),
                truncated: true
            }
        );
        assert_eq!(
            read(p, 0),
            Response::File {
                data: Vec::new(),
                truncated: true
            }
        );
    }

    #[test]
    fn read_errors_have_codes() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        assert_eq!(
            code(read(missing.to_str().unwrap(), 10)),
            ErrorCode::NotFound
        );
        assert_eq!(
            code(read(dir.path().to_str().unwrap(), 10)),
            ErrorCode::Invalid
        );
    }
}
