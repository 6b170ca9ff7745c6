//! `hangar capsule …`: create, list, get, pause, resume, snapshot, exec, destroy.

use std::time::Duration;

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use super::{Client, ClientArgs, Failure, Output, table, wait};

#[derive(Args)]
#[command(after_help = super::EXIT_CODES)]
pub struct CapsuleArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: CapsuleCommand,
}

#[derive(Subcommand)]
enum CapsuleCommand {
    /// Creates a capsule (202: an operation to follow).
    Create {
        /// Template to start from.
        #[arg(long, default_value = "base")]
        template: String,
        /// vCPUs (default: the template's).
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory in MiB (default: the template's).
        #[arg(long)]
        memory_mb: Option<u32>,
        /// Seconds of inactivity before it is auto-paused.
        #[arg(long)]
        timeout_sec: Option<u32>,
        #[command(flatten)]
        wait: WaitFlag,
    },
    /// Lists capsules, newest first.
    List {
        /// Only capsules in this status.
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long)]
        limit: Option<u32>,
        /// Every team's capsules (admin keys).
        #[arg(long)]
        all: bool,
    },
    /// Shows one capsule.
    Get { id: String },
    /// Pauses a running capsule.
    Pause {
        id: String,
        #[command(flatten)]
        wait: WaitFlag,
    },
    /// Resumes a paused capsule.
    Resume {
        id: String,
        #[command(flatten)]
        wait: WaitFlag,
    },
    /// Snapshots a capsule into a template (then destroys it unless --keep).
    Snapshot {
        id: String,
        /// Name of the template.
        #[arg(long)]
        name: String,
        /// Keep the capsule after the snapshot.
        #[arg(long)]
        keep: bool,
        #[command(flatten)]
        wait: WaitFlag,
    },
    /// Runs a command in a capsule; prints its stdout and stderr as they are and exits with
    /// its exit code.
    Exec {
        id: String,
        /// Seconds before the command is killed.
        #[arg(long)]
        timeout_sec: Option<u64>,
        /// The program and its arguments (after `--`).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        argv: Vec<String>,
    },
    /// Destroys a capsule (accepted in any state).
    Destroy {
        id: String,
        #[command(flatten)]
        wait: WaitFlag,
    },
}

#[derive(Args)]
struct WaitFlag {
    /// Follow the operation until it ends (exit 1 if it fails).
    #[arg(long)]
    wait: bool,
}

impl CapsuleArgs {
    pub async fn run(self) -> Result<i32, Failure> {
        let client = Client::new(&self.client);
        let c = &client;
        match self.command {
            CapsuleCommand::Create {
                template,
                vcpus,
                memory_mb,
                timeout_sec,
                wait,
            } => {
                let mut body = json!({ "template": template });
                let optional = [
                    ("vcpus", vcpus),
                    ("memory_mb", memory_mb),
                    ("timeout_sec", timeout_sec),
                ];
                for (field, value) in optional {
                    if let Some(value) = value {
                        body[field] = json!(value);
                    }
                }
                let accepted = c.post("/v1/capsules", body).await?;
                wait::accepted(c, accepted, wait.wait).await
            }
            CapsuleCommand::List { status, limit, all } => {
                let base = if all {
                    "/v1/admin/capsules"
                } else {
                    "/v1/capsules"
                };
                let mut query = Vec::new();
                if let Some(status) = status {
                    query.push(format!("status={status}"));
                }
                if let Some(limit) = limit {
                    query.push(format!("limit={limit}"));
                }
                let page = c.get(&format!("{base}?{}", query.join("&"))).await?;
                c.print(&page, |p| table::capsules(items(p, "capsules")));
                Ok(0)
            }
            CapsuleCommand::Get { id } => {
                let capsule = c.get(&format!("/v1/capsules/{id}")).await?;
                c.print(&capsule, |one| table::capsules(std::slice::from_ref(one)));
                Ok(0)
            }
            CapsuleCommand::Pause { id, wait } => lifecycle(c, &id, "pause", json!({}), wait).await,
            CapsuleCommand::Resume { id, wait } => {
                lifecycle(c, &id, "resume", json!({}), wait).await
            }
            CapsuleCommand::Snapshot {
                id,
                name,
                keep,
                wait,
            } => {
                let body = json!({ "name": name, "keep": keep });
                lifecycle(c, &id, "snapshot", body, wait).await
            }
            CapsuleCommand::Exec {
                id,
                timeout_sec,
                argv,
            } => exec(c, &id, argv, timeout_sec).await,
            CapsuleCommand::Destroy { id, wait } => {
                let accepted = c.delete(&format!("/v1/capsules/{id}")).await?;
                wait::accepted(c, accepted, wait.wait).await
            }
        }
    }
}

/// The items of a listing page.
fn items<'a>(page: &'a Value, key: &str) -> &'a [Value] {
    page[key].as_array().map_or(&[], Vec::as_slice)
}

async fn lifecycle(
    c: &Client,
    id: &str,
    action: &str,
    body: Value,
    wait: WaitFlag,
) -> Result<i32, Failure> {
    let accepted = c.post(&format!("/v1/capsules/{id}/{action}"), body).await?;
    wait::accepted(c, accepted, wait.wait).await
}

async fn exec(
    c: &Client,
    id: &str,
    argv: Vec<String>,
    timeout_sec: Option<u64>,
) -> Result<i32, Failure> {
    let mut body = json!({ "argv": argv });
    if let Some(secs) = timeout_sec {
        body["timeout_sec"] = json!(secs);
    }
    // The API waits for the command (up to its own limit): give it that long and more.
    let limit = Duration::from_secs(timeout_sec.unwrap_or(600) + 60);
    let path = format!("/v1/capsules/{id}/exec");
    let output = c.send(Method::POST, &path, Some(body), limit).await?;
    if c.output == Output::Json {
        c.print(&output, |_| String::new());
    } else {
        use std::io::Write;
        let stdout = output["stdout"].as_str().unwrap_or_default();
        let stderr = output["stderr"].as_str().unwrap_or_default();
        let _ = std::io::stdout().write_all(stdout.as_bytes());
        let _ = std::io::stderr().write_all(stderr.as_bytes());
    }
    Ok(output["exit_code"]
        .as_i64()
        .and_then(|code| i32::try_from(code).ok())
        .unwrap_or(1))
}
