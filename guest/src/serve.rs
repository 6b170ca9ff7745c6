//! Frames in, responses out: splitting the byte stream into requests and answering each.
//! No I/O here (see `port.rs`), so the malformed-input handling is testable on the host.

use hangar_guest::protocol::{
    self, ErrorCode, MAX_FRAME, Request, RequestFrame, Response, ResponseFrame,
};

use crate::{error_response, exec, files};

/// What the front of the buffer held.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    Request(RequestFrame),
    /// A whole frame that is not a valid request but names its id: answer `Error{invalid}`.
    Invalid {
        id: u64,
        message: String,
    },
    /// Bytes that cannot be answered; the buffer was dropped to resynchronise on the next
    /// write from the host (hosts write whole frames).
    Dropped(String),
}

/// Takes the next whole frame off `buf`, or `None` if more bytes are needed.
pub fn next_frame(buf: &mut Vec<u8>) -> Option<Incoming> {
    if buf.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME {
        let dropped = buf.len();
        buf.clear();
        return Some(Incoming::Dropped(format!(
            "frame length {len} over the limit; dropped {dropped} bytes"
        )));
    }
    if buf.len() < 4 + len {
        return None;
    }
    let parsed = serde_json::from_slice::<RequestFrame>(&buf[4..4 + len]);
    let incoming = match parsed {
        Ok(frame) => Incoming::Request(frame),
        Err(e) => {
            // The id alone may still be readable, e.g. an unknown request type.
            let id = serde_json::from_slice::<serde_json::Value>(&buf[4..4 + len])
                .ok()
                .and_then(|v| v.get("id")?.as_u64());
            match id {
                Some(id) => Incoming::Invalid {
                    id,
                    message: format!("malformed request: {e}"),
                },
                None => {
                    let dropped = buf.len();
                    buf.clear();
                    return Some(Incoming::Dropped(format!(
                        "unreadable frame ({e}); dropped {dropped} bytes"
                    )));
                }
            }
        }
    };
    buf.drain(..4 + len);
    Some(incoming)
}

/// Answers one request.
pub fn respond(boot_id: &str, request: &Request) -> Response {
    match request {
        Request::Hello { version } if *version == protocol::VERSION => Response::Ready {
            version: protocol::VERSION,
            boot_id: boot_id.to_owned(),
        },
        Request::Hello { version } => error_response(
            ErrorCode::Version,
            format!(
                "host speaks protocol {version}, this guest {}",
                protocol::VERSION
            ),
        ),
        Request::Exec(req) => exec::run(req),
        Request::WriteFile { path, data, mode } => files::write(path, data, *mode),
        Request::ReadFile { path, max_bytes } => files::read(path, *max_bytes),
    }
}

/// The encoded response to `incoming`, if it gets one.
pub fn handle(boot_id: &str, incoming: Incoming) -> Option<Vec<u8>> {
    let (id, response) = match incoming {
        Incoming::Request(frame) => (frame.id, respond(boot_id, &frame.request)),
        Incoming::Invalid { id, message } => (id, error_response(ErrorCode::Invalid, message)),
        Incoming::Dropped(_) => return None,
    };
    match protocol::encode(&ResponseFrame { id, response }) {
        Ok(bytes) => Some(bytes),
        // Only a huge response can fail; say so instead of leaving the host waiting.
        Err(e) => protocol::encode(&ResponseFrame {
            id,
            response: error_response(ErrorCode::Invalid, format!("response too large: {e}")),
        })
        .ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(value: serde_json::Value) -> Vec<u8> {
        protocol::encode(&value).unwrap()
    }

    fn decode(bytes: &[u8]) -> ResponseFrame {
        let mut buf = bytes.to_vec();
        protocol::decode(&mut buf).unwrap().unwrap()
    }

    #[test]
    fn hello_gets_ready_with_the_same_id() {
        let mut buf = frame(serde_json::json!({"id": 42, "type": "hello", "version": 1}));
        buf.extend(frame(
            serde_json::json!({"id": 43, "type": "hello", "version": 1}),
        ));
        for id in [42, 43] {
            let incoming = next_frame(&mut buf).unwrap();
            let resp = decode(&handle("b-1", incoming).unwrap());
            assert_eq!(resp.id, id);
            assert_eq!(
                resp.response,
                Response::Ready {
                    version: 1,
                    boot_id: "b-1".into()
                }
            );
        }
        assert!(next_frame(&mut buf).is_none());
    }

    #[test]
    fn wrong_version_is_refused() {
        let mut buf = frame(serde_json::json!({"id": 1, "type": "hello", "version": 99}));
        let resp = decode(&handle("b", next_frame(&mut buf).unwrap()).unwrap());
        assert!(matches!(
            resp.response,
            Response::Error {
                code: ErrorCode::Version,
                ..
            }
        ));
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let whole = frame(serde_json::json!({"id": 5, "type": "hello", "version": 1}));
        let mut buf = whole[..whole.len() - 1].to_vec();
        assert!(next_frame(&mut buf).is_none());
        buf.push(*whole.last().unwrap());
        assert!(matches!(next_frame(&mut buf), Some(Incoming::Request(_))));
    }

    #[test]
    fn malformed_input_never_panics() {
        // An unknown type with a readable id: answered, and the next frame still works.
        let mut buf = frame(serde_json::json!({"id": 9, "type": "reboot"}));
        buf.extend(frame(
            serde_json::json!({"id": 10, "type": "hello", "version": 1}),
        ));
        let resp = decode(&handle("b", next_frame(&mut buf).unwrap()).unwrap());
        assert_eq!(resp.id, 9);
        assert!(matches!(
            resp.response,
            Response::Error {
                code: ErrorCode::Invalid,
                ..
            }
        ));
        assert!(matches!(next_frame(&mut buf), Some(Incoming::Request(_))));

        // Not JSON at all: no id to answer, the buffer is dropped.
        let mut buf = 3u32.to_be_bytes().to_vec();
        buf.extend(b"\xff\x00{");
        buf.extend(b"trailing");
        assert!(matches!(next_frame(&mut buf), Some(Incoming::Dropped(_))));
        assert!(buf.is_empty());

        // A length over the limit.
        let mut buf = u32::MAX.to_be_bytes().to_vec();
        assert!(matches!(next_frame(&mut buf), Some(Incoming::Dropped(_))));
        assert!(buf.is_empty());

        // Valid JSON, wrong shape (bad base64).
        let mut buf = frame(
            serde_json::json!({"id": 3, "type": "write_file", "path": "/x",
            "data": "!!", "mode": null}),
        );
        assert!(matches!(
            next_frame(&mut buf),
            Some(Incoming::Invalid { id: 3, .. })
        ));
    }

    #[test]
    fn huge_responses_become_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        std::fs::write(&path, vec![b'x'; MAX_FRAME]).unwrap();
        let incoming = Incoming::Request(RequestFrame {
            id: 1,
            request: Request::ReadFile {
                path: path.to_str().unwrap().into(),
                max_bytes: u64::MAX,
            },
        });
        let resp = decode(&handle("b", incoming).unwrap());
        match resp.response {
            // Capped to what fits in a frame.
            Response::File { data, truncated } => {
                assert!(truncated);
                assert_eq!(data.len() as u64, files::READ_CAP);
            }
            other => panic!("{other:?}"),
        }
    }
}
