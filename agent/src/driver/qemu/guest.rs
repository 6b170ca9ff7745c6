//! The host side of the guest protocol (`hangar_guest::protocol`) over the VM's `agent0`
//! virtio-serial port, which QEMU exposes as a unix socket.
//!
//! Every connection starts with `Hello` and waits for `Ready`. Until the guest agent has
//! opened its port (a cold boot), a `Hello` may be dropped, so it is resent on the same
//! connection; stale `Ready`s from earlier `Hello`s are skipped by id later.

use std::path::Path;
use std::time::Duration;

use hangar_guest::protocol::{
    self, ErrorCode, FrameError, Request, RequestFrame, Response, ResponseFrame,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::{Instant, timeout_at};

/// How long one `Hello` is given before another is sent.
const HELLO_RETRY: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("guest connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("guest did not answer in time")]
    Timeout,
    #[error("guest closed the connection")]
    Closed,
    #[error("guest protocol: {0}")]
    Protocol(String),
    #[error("guest refused: {code:?}: {message}")]
    Refused { code: ErrorCode, message: String },
}

impl From<FrameError> for GuestError {
    fn from(e: FrameError) -> Self {
        Self::Protocol(e.to_string())
    }
}

pub struct GuestConn {
    stream: UnixStream,
    buf: Vec<u8>,
    next_id: u64,
    /// Changes at every guest boot, not at a restore.
    pub boot_id: String,
}

impl GuestConn {
    /// Connects to the VM's agent socket and completes the handshake before `deadline`.
    pub async fn connect(path: &Path, deadline: Instant) -> Result<Self, GuestError> {
        loop {
            let stream = loop {
                match UnixStream::connect(path).await {
                    Ok(s) => break s,
                    Err(e) if Instant::now() >= deadline => return Err(e.into()),
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            };
            let mut conn = Self {
                stream,
                buf: Vec::new(),
                // Random, not 1: a restored guest may still send answers to the Hellos of
                // the connection its snapshot was taken under, and they must not match ours.
                next_id: rand::random_range(1..1u64 << 48),
                boot_id: String::new(),
            };
            match conn.handshake(deadline).await {
                Ok(()) => return Ok(conn),
                // QEMU drops the socket connection if the port is reset; start over.
                Err(GuestError::Closed | GuestError::Io(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn handshake(&mut self, deadline: Instant) -> Result<(), GuestError> {
        let first_id = self.next_id;
        loop {
            let hello = Request::Hello {
                version: protocol::VERSION,
            };
            let id = self.send(hello).await?;
            let attempt = (Instant::now() + HELLO_RETRY).min(deadline);
            loop {
                match timeout_at(attempt, self.read_frame()).await {
                    Err(_) if attempt >= deadline => return Err(GuestError::Timeout),
                    Err(_) => break,
                    Ok(frame) => {
                        let frame = frame?;
                        if frame.id < first_id || frame.id > id {
                            continue;
                        }
                        return match frame.response {
                            Response::Ready { boot_id, .. } => {
                                self.boot_id = boot_id;
                                Ok(())
                            }
                            Response::Error { code, message } => {
                                Err(GuestError::Refused { code, message })
                            }
                            other => Err(GuestError::Protocol(format!(
                                "expected ready, got {other:?}"
                            ))),
                        };
                    }
                }
            }
        }
    }

    /// Sends `request` and waits for its response until `deadline`. A guest `Error` response
    /// becomes [`GuestError::Refused`]. After any other error the connection should be
    /// dropped (the guest may still be working on the request).
    pub async fn call(
        &mut self,
        request: Request,
        deadline: Instant,
    ) -> Result<Response, GuestError> {
        let exchange = async {
            let id = self.send(request).await?;
            loop {
                let frame = self.read_frame().await?;
                if frame.id == id {
                    return Ok(frame.response);
                }
            }
        };
        match timeout_at(deadline, exchange).await {
            Err(_) => Err(GuestError::Timeout),
            Ok(Ok(Response::Error { code, message })) => Err(GuestError::Refused { code, message }),
            Ok(other) => other,
        }
    }

    async fn send(&mut self, request: Request) -> Result<u64, GuestError> {
        let id = self.next_id;
        self.next_id += 1;
        let bytes = protocol::encode(&RequestFrame { id, request })?;
        self.stream.write_all(&bytes).await?;
        Ok(id)
    }

    /// Cancel safe: a partial frame stays in `buf`.
    async fn read_frame(&mut self) -> Result<ResponseFrame, GuestError> {
        loop {
            if let Some(frame) = protocol::decode::<ResponseFrame>(&mut self.buf)? {
                return Ok(frame);
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(GuestError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use hangar_guest::protocol::ExecResult;
    use tokio::net::UnixListener;

    use super::*;

    /// A fake guest agent: ignores the first `drop_hellos` Hellos (a port not yet open), then
    /// answers Hello with Ready and Exec with the argv joined as stdout.
    async fn fake_guest(listener: UnixListener, mut drop_hellos: usize) {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            loop {
                let mut chunk = [0u8; 4096];
                let Ok(n) = stream.read(&mut chunk).await else {
                    break;
                };
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                while let Some(frame) = protocol::decode::<RequestFrame>(&mut buf).unwrap() {
                    let response = match frame.request {
                        Request::Hello { .. } if drop_hellos > 0 => {
                            drop_hellos -= 1;
                            continue;
                        }
                        Request::Hello { version } => Response::Ready {
                            version,
                            boot_id: "boot-1".into(),
                        },
                        Request::Exec(e) if e.argv[0] == "missing" => Response::Error {
                            code: ErrorCode::NotFound,
                            message: "no such program".into(),
                        },
                        Request::Exec(e) => Response::Exec(ExecResult {
                            stdout: e.argv.join(" ").into_bytes(),
                            stderr: Vec::new(),
                            exit_code: 0,
                            stdout_truncated: false,
                            stderr_truncated: false,
                            timed_out: false,
                            duration_ms: 1,
                        }),
                        other => panic!("unexpected {other:?}"),
                    };
                    let out = protocol::encode(&ResponseFrame {
                        id: frame.id,
                        response,
                    })
                    .unwrap();
                    stream.write_all(&out).await.unwrap();
                }
            }
        }
    }

    fn exec(argv: &[&str]) -> Request {
        Request::Exec(protocol::ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            cwd: None,
            stdin: Vec::new(),
            timeout_ms: 1000,
            max_output_bytes: 1024,
        })
    }

    #[tokio::test]
    async fn hello_is_resent_until_ready_and_calls_match_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(fake_guest(listener, 2));
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut conn = GuestConn::connect(&path, deadline).await.unwrap();
        assert_eq!(conn.boot_id, "boot-1");
        let deadline = Instant::now() + Duration::from_secs(5);
        match conn.call(exec(&["echo", "hi"]), deadline).await.unwrap() {
            Response::Exec(r) => assert_eq!(r.stdout, b"echo hi"),
            other => panic!("{other:?}"),
        }
        let err = conn.call(exec(&["missing"]), deadline).await.unwrap_err();
        assert!(matches!(
            err,
            GuestError::Refused {
                code: ErrorCode::NotFound,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn a_silent_guest_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(fake_guest(listener, usize::MAX));
        let deadline = Instant::now() + Duration::from_millis(500);
        let err = GuestConn::connect(&path, deadline).await.err().unwrap();
        assert!(matches!(err, GuestError::Timeout), "{err}");
    }
}
