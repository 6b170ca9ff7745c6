//! A small async QMP client over QEMU's unix socket: greeting, `qmp_capabilities`, commands
//! with ids and deadlines. Asynchronous events that arrive between replies are kept so the
//! VM's owner task can see them (and log them) instead of mistaking them for replies.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::{Instant, timeout_at};

/// Replies and greetings longer than this mean something is badly wrong.
const MAX_LINE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP {0} timed out")]
    Timeout(String),
    #[error("QMP connection closed")]
    Closed,
    #[error("QMP protocol: {0}")]
    Protocol(String),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

/// An asynchronous QMP event (`STOP`, `RESUME`, `SHUTDOWN`, …).
#[derive(Clone, Debug, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
}

pub struct Qmp {
    stream: UnixStream,
    /// Bytes read but not yet split into lines; kept here so a cancelled read loses nothing.
    buf: Vec<u8>,
    next_id: u64,
    events: Vec<QmpEvent>,
}

impl Qmp {
    /// Connects to `path` (retrying while QEMU has not created or is not accepting on it yet),
    /// reads the greeting and enters command mode, all before `deadline`.
    ///
    /// QEMU serves one QMP client at a time, so this also waits for a previous client (an
    /// agent that is going away) to let go.
    pub async fn connect(path: &Path, deadline: Instant) -> Result<Self, QmpError> {
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(stream) => break stream,
                Err(e) if Instant::now() >= deadline => return Err(e.into()),
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let mut qmp = Self {
            stream,
            buf: Vec::new(),
            next_id: 1,
            events: Vec::new(),
        };
        let greeting = timeout_at(deadline, qmp.read_message())
            .await
            .map_err(|_| QmpError::Timeout("greeting".into()))??;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "unexpected greeting {greeting}"
            )));
        }
        qmp.execute_until("qmp_capabilities", None, deadline)
            .await?;
        Ok(qmp)
    }

    /// Runs `command` and returns its `return` value, or fails after `timeout`.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.execute_until(command, arguments, Instant::now() + timeout)
            .await
    }

    async fn execute_until(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        deadline: Instant,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let mut line =
            serde_json::to_vec(&message).map_err(|e| QmpError::Protocol(e.to_string()))?;
        line.push(b'\n');
        let exchange = async {
            self.stream.write_all(&line).await?;
            loop {
                let reply = self.read_message().await?;
                if let Some(event) = parse_event(&reply) {
                    self.events.push(event);
                    continue;
                }
                // Replies to commands that timed out earlier carry older ids: skip them.
                if reply.get("id").and_then(Value::as_u64) != Some(id) {
                    continue;
                }
                if let Some(value) = reply.get("return") {
                    return Ok(value.clone());
                }
                let error = reply.get("error").cloned().unwrap_or_default();
                let text = |key: &str| {
                    error
                        .get(key)
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_owned()
                };
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: text("class"),
                    desc: text("desc"),
                });
            }
        };
        timeout_at(deadline, exchange)
            .await
            .map_err(|_| QmpError::Timeout(command.to_owned()))?
    }

    /// Waits for the next asynchronous event (cancel safe); `Closed` when QEMU went away.
    pub async fn next_event(&mut self) -> Result<QmpEvent, QmpError> {
        loop {
            if !self.events.is_empty() {
                return Ok(self.events.remove(0));
            }
            let message = self.read_message().await?;
            if let Some(event) = parse_event(&message) {
                return Ok(event);
            }
        }
    }

    /// Events received while waiting for replies, oldest first.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        std::mem::take(&mut self.events)
    }

    /// One JSON message (QMP sends one per line). Cancel safe: partial lines stay in `buf`.
    async fn read_message(&mut self) -> Result<Value, QmpError> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                return serde_json::from_slice(line)
                    .map_err(|e| QmpError::Protocol(format!("bad JSON from QEMU: {e}")));
            }
            if self.buf.len() > MAX_LINE {
                return Err(QmpError::Protocol("line too long".into()));
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(QmpError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn parse_event(message: &Value) -> Option<QmpEvent> {
    let name = message.get("event")?.as_str()?.to_owned();
    let data = message.get("data").cloned().unwrap_or(Value::Null);
    Some(QmpEvent { name, data })
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::UnixListener;

    use super::*;

    /// A fake QEMU: greets, then answers each command per `reply` (None = stay silent),
    /// sending a STOP event before every reply.
    async fn fake_qemu(listener: UnixListener, reply: fn(&Value) -> Option<Value>) {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        write
            .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
            .await
            .unwrap();
        let mut lines = BufReader::new(read).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let request: Value = serde_json::from_str(&line).unwrap();
            let Some(mut answer) = reply(&request) else {
                continue;
            };
            answer["id"] = request["id"].clone();
            let event = json!({"event": "STOP", "data": {}, "timestamp": {}});
            let out = format!("{event}\r\n{answer}\r\n");
            // Split writes exercise partial-line handling.
            let (a, b) = out.as_bytes().split_at(out.len() / 2);
            write.write_all(a).await.unwrap();
            write.flush().await.unwrap();
            write.write_all(b).await.unwrap();
        }
    }

    fn answers(request: &Value) -> Option<Value> {
        match request["execute"].as_str().unwrap() {
            "qmp_capabilities" | "stop" => Some(json!({"return": {}})),
            "query-status" => Some(json!({"return": {"status": "paused", "running": false}})),
            "hang" => None,
            other => Some(json!({"error": {"class": "CommandNotFound", "desc": other}})),
        }
    }

    #[tokio::test]
    async fn commands_events_errors_and_timeouts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(fake_qemu(listener, answers));
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut qmp = Qmp::connect(&path, deadline).await.unwrap();
        let t = Duration::from_secs(5);

        let status = qmp.execute("query-status", None, t).await.unwrap();
        assert_eq!(status["status"], "paused");
        let err = qmp.execute("nope", None, t).await.unwrap_err();
        assert!(matches!(err, QmpError::Command { ref class, .. } if class == "CommandNotFound"));
        let err = qmp
            .execute("hang", None, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::Timeout(_)));
        // The connection stays usable after a timeout.
        qmp.execute("stop", None, t).await.unwrap();
        let events = qmp.take_events();
        assert!(events.len() >= 3, "{events:?}");
        assert!(events.iter().all(|e| e.name == "STOP"));
    }

    #[tokio::test]
    async fn connect_waits_for_the_socket_and_reports_eof() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let late = path.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let listener = UnixListener::bind(&late).unwrap();
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            write.write_all(b"{\"QMP\": {}}\n").await.unwrap();
            let mut lines = BufReader::new(read).lines();
            let line = lines.next_line().await.unwrap().unwrap();
            let id = serde_json::from_str::<Value>(&line).unwrap()["id"].clone();
            let reply = json!({"return": {}, "id": id});
            write
                .write_all(format!("{reply}\n").as_bytes())
                .await
                .unwrap();
            // Dropping both halves closes the connection, as a dying QEMU does.
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut qmp = Qmp::connect(&path, deadline).await.unwrap();
        let err = qmp.next_event().await.unwrap_err();
        assert!(matches!(err, QmpError::Closed), "{err}");
        let missing = dir.path().join("none.sock");
        let soon = Instant::now() + Duration::from_millis(30);
        assert!(Qmp::connect(&missing, soon).await.is_err());
    }
}
