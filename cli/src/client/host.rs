//! `hangar host …` (admin keys): list, cordon, uncordon, drain.

use clap::{Args, Subcommand};
use serde_json::json;

use super::{Client, ClientArgs, Failure, table};

#[derive(Args)]
#[command(after_help = super::EXIT_CODES)]
pub struct HostArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: HostCommand,
}

#[derive(Subcommand)]
enum HostCommand {
    /// Lists the hosts, their health, scheduling and reservations.
    List,
    /// Stops placing new capsules on a host.
    Cordon { id: String },
    /// Places capsules on a host again (also ends a drain).
    Uncordon { id: String },
    /// Cordons a host, marks it draining, and lists the capsules still on it.
    Drain { id: String },
}

impl HostArgs {
    pub async fn run(self) -> Result<i32, Failure> {
        let client = Client::new(&self.client);
        let c = &client;
        match self.command {
            HostCommand::List => {
                let hosts = c.get("/v1/admin/hosts").await?;
                c.print(&hosts, |h| {
                    table::hosts(h["hosts"].as_array().map_or(&[], Vec::as_slice))
                });
            }
            HostCommand::Cordon { id } => set_cordoned(c, &id, "cordon").await?,
            HostCommand::Uncordon { id } => set_cordoned(c, &id, "uncordon").await?,
            HostCommand::Drain { id } => {
                let drained = c
                    .post(&format!("/v1/admin/hosts/{id}/drain"), json!({}))
                    .await?;
                c.print(&drained, |d| {
                    let capsules = d["capsules"].as_array().map_or(&[][..], Vec::as_slice);
                    format!(
                        "{}\n{} capsule(s) still on it:\n{}",
                        table::hosts(&[d["host"].clone()]),
                        capsules.len(),
                        table::capsules(capsules)
                    )
                });
            }
        }
        Ok(0)
    }
}

async fn set_cordoned(c: &Client, id: &str, action: &str) -> Result<(), Failure> {
    let host = c
        .post(&format!("/v1/admin/hosts/{id}/{action}"), json!({}))
        .await?;
    c.print(&host, |h| table::hosts(std::slice::from_ref(h)));
    Ok(())
}
