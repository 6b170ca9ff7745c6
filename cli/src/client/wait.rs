//! `--wait`: follows an operation until it ends, with the API's `?wait=` long poll, printing
//! each status change of the operation and its capsule as a line on stderr (and a spinner
//! when stderr is a terminal), so stdout keeps only the result.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use super::{Client, Failure, table};

/// Seconds each long poll waits at most: status changes short of the end show this late.
const POLL_SECS: u64 = 2;

/// Waits until the operation `op` is terminal; returns `{"operation", "capsule"}` as they
/// are then (the capsule `null` if it cannot be read).
pub async fn until_done(client: &Client, op: &Value) -> Result<Value, Failure> {
    let id = op["id"].as_str().unwrap_or_default().to_owned();
    let kind = op["kind"].as_str().unwrap_or("operation").to_owned();
    let capsule_id = op["capsule_id"].as_str().map(str::to_owned);
    let progress = Progress::start(format!("{kind} {id}"));
    let mut seen_op = String::new();
    let mut seen_capsule = String::new();
    let (op, capsule) = loop {
        let op = client
            .send(
                Method::GET,
                &format!("/v1/operations/{id}?wait={POLL_SECS}"),
                None,
                Duration::from_secs(POLL_SECS + 60),
            )
            .await?;
        let capsule = match &capsule_id {
            Some(cid) => capsule(client, cid).await?,
            None => Value::Null,
        };
        let status = op["status"].as_str().unwrap_or_default().to_owned();
        if status != seen_op {
            let attempts = format!("attempt {}/{}", op["attempts"], op["max_attempts"]);
            progress.line(format!("{id}: {kind} {status} ({attempts})"));
            seen_op = status.clone();
        }
        if let Some(cstatus) = capsule["status"].as_str()
            && cstatus != seen_capsule
        {
            progress.line(format!(
                "{}: capsule {cstatus}",
                capsule["id"].as_str().unwrap_or("-")
            ));
            seen_capsule = cstatus.to_owned();
        }
        progress.message(format!("{kind} {id}: {status}, capsule {seen_capsule}"));
        if matches!(status.as_str(), "succeeded" | "failed" | "cancelled") {
            break (op, capsule);
        }
    };
    progress.finish();
    Ok(json!({ "operation": op, "capsule": capsule }))
}

/// Success, or the failure of an operation that ended failed or cancelled.
pub fn outcome(done: &Value) -> Result<i32, Failure> {
    let op = &done["operation"];
    if op["status"] == "succeeded" {
        return Ok(0);
    }
    let text = |key: &str| op[key].as_str().unwrap_or_default().to_owned();
    let code = op["error_code"]
        .as_str()
        .unwrap_or("operation_failed")
        .to_owned();
    let reason = op["last_error"].as_str().unwrap_or("no reason recorded");
    Err(Failure::OperationFailed {
        code,
        message: format!(
            "{} {} {}: {reason}",
            text("kind"),
            text("id"),
            text("status")
        ),
    })
}

/// Prints a 202's operation, or with `wait` follows it and prints where it ended.
pub async fn accepted(client: &Client, body: Value, wait: bool) -> Result<i32, Failure> {
    if !wait {
        client.print(&body, |b| table::operations(&[b["operation"].clone()]));
        return Ok(0);
    }
    let done = until_done(client, &body["operation"]).await?;
    client.print(&done, |d| {
        let mut out = table::operations(&[d["operation"].clone()]);
        if !d["capsule"].is_null() {
            out.push('\n');
            out.push_str(&table::capsules(&[d["capsule"].clone()]));
        }
        out
    });
    outcome(&done)
}

/// The capsule through the team route, or the admin route for another team's capsule (an
/// operator following a retry); `null` when neither knows it.
async fn capsule(client: &Client, id: &str) -> Result<Value, Failure> {
    for path in [
        format!("/v1/capsules/{id}"),
        format!("/v1/admin/capsules/{id}"),
    ] {
        match client.get(&path).await {
            Ok(capsule) => return Ok(capsule),
            Err(Failure::Refused { .. }) => continue,
            Err(other) => return Err(other),
        }
    }
    Ok(Value::Null)
}

/// Lines on stderr, and on a terminal a spinner below them redrawn by a background task.
struct Progress {
    spinner: Option<(Arc<Mutex<String>>, tokio::task::JoinHandle<()>)>,
}

const FRAMES: [&str; 10] = ["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏"];

impl Progress {
    fn start(message: String) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self { spinner: None };
        }
        let shared = Arc::new(Mutex::new(message));
        let text = shared.clone();
        let task = tokio::spawn(async move {
            for frame in FRAMES.iter().cycle() {
                {
                    let text = text.lock().expect("spinner text");
                    let mut err = std::io::stderr().lock();
                    let _ = write!(err, "\r\x1b[2K{frame} {text}");
                    let _ = err.flush();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self {
            spinner: Some((shared, task)),
        }
    }

    fn message(&self, message: String) {
        if let Some((text, _)) = &self.spinner {
            *text.lock().expect("spinner text") = message;
        }
    }

    /// A line above the spinner (the spinner's lock keeps them from interleaving).
    fn line(&self, line: String) {
        match &self.spinner {
            Some((text, _)) => {
                let _guard = text.lock().expect("spinner text");
                eprint!("\r\x1b[2K{line}\n");
            }
            None => eprintln!("{line}"),
        }
    }

    fn finish(self) {
        if let Some((text, task)) = self.spinner {
            task.abort();
            let _guard = text.lock().expect("spinner text");
            eprint!("\r\x1b[2K");
        }
    }
}
