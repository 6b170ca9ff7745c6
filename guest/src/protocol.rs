//! The guest protocol, version 1: length-prefixed JSON frames over a byte stream.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON, at most
//! [`MAX_FRAME`]. The host sends [`Request`]s, each with an `id` it chose; the guest answers
//! every request with exactly one [`Response`] carrying the same `id`, in order. Binary
//! payloads (stdin, output, file contents) are base64 in the JSON.
//!
//! The port drops whatever is in flight when the host disconnects (an agent restart, a
//! snapshot restore), so a host starts every connection with [`Request::Hello`] and waits for
//! [`Response::Ready`] before anything else; a guest that reads end-of-file discards its
//! partial frame and waits for the next connection.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks; `Hello` and `Ready` both carry it.
pub const VERSION: u32 = 1;

/// The largest frame either side accepts (the length prefix excluded).
pub const MAX_FRAME: usize = 16 << 20;

/// The name of the virtio-serial port the guest agent listens on.
pub const PORT_NAME: &str = "agent0";

/// A request from the host, with the id its response will carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestFrame {
    pub id: u64,
    #[serde(flatten)]
    pub request: Request,
}

/// A response from the guest to the request with the same id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseFrame {
    pub id: u64,
    #[serde(flatten)]
    pub response: Response,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Opens a conversation; answered by `Ready` (or `Error{code: "version"}`).
    Hello {
        version: u32,
    },
    Exec(ExecRequest),
    WriteFile {
        path: String,
        #[serde(with = "b64")]
        data: Vec<u8>,
        /// Unix permission bits, 0o644 when absent.
        mode: Option<u32>,
    },
    ReadFile {
        path: String,
        /// Read at most this many bytes; the response says whether the file was longer.
        max_bytes: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The program and its arguments; the program is looked up on `PATH`.
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    #[serde(default, with = "b64")]
    pub stdin: Vec<u8>,
    /// The guest kills the process (and its process group) after this long.
    pub timeout_ms: u64,
    /// Output beyond this many bytes per stream is dropped and marked truncated.
    pub max_output_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Ready {
        version: u32,
        /// Changes at every boot (not at a restore), so the host can tell a rebooted guest.
        boot_id: String,
    },
    Exec(ExecResult),
    FileWritten {
        bytes: u64,
    },
    File {
        #[serde(with = "b64")]
        data: Vec<u8>,
        truncated: bool,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecResult {
    #[serde(with = "b64")]
    pub stdout: Vec<u8>,
    #[serde(with = "b64")]
    pub stderr: Vec<u8>,
    /// The exit status; 128 + signal number when killed by a signal (as shells report it).
    pub exit_code: i32,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// True when the guest killed the process at `timeout_ms`.
    pub timed_out: bool,
    pub duration_ms: u64,
}

/// Why the guest refused or failed a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The host's protocol version is not spoken here.
    Version,
    /// Malformed or out-of-range request.
    Invalid,
    /// The program or file does not exist.
    NotFound,
    /// Permission denied.
    Denied,
    /// Anything else the guest's OS reported.
    Io,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Encodes one frame: the length prefix and the JSON body.
pub fn encode<T: Serialize>(frame: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(frame)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Takes one whole frame off the front of `buf` if it holds one: `Ok(None)` means "read more".
/// A length over [`MAX_FRAME`] is an error (the stream is then out of sync: reconnect).
pub fn decode<T: for<'de> Deserialize<'de>>(buf: &mut Vec<u8>) -> Result<Option<T>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let parsed = serde_json::from_slice(&buf[4..4 + len]);
    buf.drain(..4 + len);
    Ok(Some(parsed?))
}

mod b64 {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_byte_by_byte() {
        let frame = RequestFrame {
            id: 7,
            request: Request::Exec(ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "cat".into()],
                env: vec![("A".into(), "1".into())],
                cwd: None,
                stdin: b"\x00\xffhello".to_vec(),
                timeout_ms: 1000,
                max_output_bytes: 64,
            }),
        };
        let wire = encode(&frame).unwrap();
        let mut buf = Vec::new();
        let mut decoded = None;
        for byte in &wire {
            assert!(decoded.is_none(), "decoded before the last byte");
            buf.push(*byte);
            decoded = decode::<RequestFrame>(&mut buf).unwrap();
        }
        assert_eq!(decoded, Some(frame));
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_and_malformed_frames_are_errors() {
        let mut buf = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        assert!(matches!(
            decode::<RequestFrame>(&mut buf),
            Err(FrameError::TooLarge(_))
        ));
        let mut buf = encode(&serde_json::json!({"id": 1, "type": "reboot"})).unwrap();
        assert!(matches!(
            decode::<RequestFrame>(&mut buf),
            Err(FrameError::Malformed(_))
        ));
        assert!(buf.is_empty(), "a malformed frame is consumed");
    }

    #[test]
    fn wire_format_is_tagged_json() {
        let json = serde_json::to_value(ResponseFrame {
            id: 3,
            response: Response::FileWritten { bytes: 5 },
        })
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"id": 3, "type": "file_written", "bytes": 5})
        );
    }
}
