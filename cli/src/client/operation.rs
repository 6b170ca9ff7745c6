//! `hangar op …`: get, wait, list, retry and cancel operations (job handles).

use clap::{Args, Subcommand};
use serde_json::json;

use super::{Client, ClientArgs, Failure, table, wait};

#[derive(Args)]
#[command(after_help = super::EXIT_CODES)]
pub struct OpArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: OpCommand,
}

#[derive(Subcommand)]
enum OpCommand {
    /// Shows one operation.
    Get { id: String },
    /// Follows an operation until it ends (exit 1 if it failed or was cancelled).
    Wait { id: String },
    /// Lists operations, newest first.
    List {
        /// Only this capsule's.
        #[arg(long)]
        capsule: Option<String>,
        /// Only in this status (queued, running, retrying, succeeded, failed, cancelled).
        #[arg(long)]
        status: Option<String>,
        /// Only of this kind (create, pause, resume, snapshot, destroy, host_event).
        #[arg(long)]
        kind: Option<String>,
        /// At most this many.
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Retries a failed operation as a new one (admin keys).
    Retry {
        id: String,
        /// Follow the new operation until it ends.
        #[arg(long)]
        wait: bool,
    },
    /// Cancels an operation no worker has started (admin keys).
    Cancel { id: String },
}

impl OpArgs {
    pub async fn run(self) -> Result<i32, Failure> {
        let client = Client::new(&self.client);
        let c = &client;
        match self.command {
            OpCommand::Get { id } => {
                let op = c.get(&format!("/v1/operations/{id}")).await?;
                c.print(&op, |one| table::operations(std::slice::from_ref(one)));
                Ok(0)
            }
            OpCommand::Wait { id } => {
                let op = c.get(&format!("/v1/operations/{id}")).await?;
                let done = wait::until_done(c, &op).await?;
                c.print(&done["operation"], |one| {
                    table::operations(std::slice::from_ref(one))
                });
                wait::outcome(&done)
            }
            OpCommand::List {
                capsule,
                status,
                kind,
                limit,
            } => {
                let filters = [
                    ("capsule_id", capsule),
                    ("status", status),
                    ("kind", kind),
                    ("limit", limit.map(|l| l.to_string())),
                ];
                let query: Vec<String> = filters
                    .into_iter()
                    .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
                    .collect();
                let page = c
                    .get(&format!("/v1/operations?{}", query.join("&")))
                    .await?;
                c.print(&page, |p| {
                    table::operations(p["operations"].as_array().map_or(&[], Vec::as_slice))
                });
                Ok(0)
            }
            OpCommand::Retry { id, wait } => {
                let path = format!("/v1/admin/operations/{id}/retry");
                let accepted = c.post(&path, json!({})).await?;
                wait::accepted(c, accepted, wait).await
            }
            OpCommand::Cancel { id } => {
                let path = format!("/v1/admin/operations/{id}/cancel");
                let cancelled = c.post(&path, json!({})).await?;
                c.print(&cancelled, |b| table::operations(&[b["operation"].clone()]));
                Ok(0)
            }
        }
    }
}
