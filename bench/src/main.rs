//! `hangar-bench`: Hangar's benchmarks. Each subcommand starts a private deployment (a fresh
//! database on `DATABASE_URL`'s server, its own Redis prefix, release `hangar` processes),
//! measures, prints markdown tables, and kills what it started. `vm` is different: it runs
//! real microVMs through the agent's `qemu` driver and gRPC server in-process (no database).
//!
//! Run them all with `ops/bench.sh`, or one: `ops/bench.sh pickup --samples 300`.

mod apalis;
mod backlog;
mod cluster;
mod cpu;
mod create;
mod dashboard;
mod pickup;
mod stages;
mod stats;
mod streams;
mod throughput;
mod vm;

use clap::{Parser, Subcommand};

use crate::cluster::Common;

#[derive(Parser)]
#[command(
    name = "hangar-bench",
    about = "Benchmarks of Hangar's enqueue and job paths, and of real microVMs"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Idle enqueue → worker pickup latency (target p50 ≤ 5 ms, p99 ≤ 25 ms).
    Pickup(pickup::PickupArgs),
    /// `POST /v1/capsules` → running, zero-latency agent (target p50 ≤ 15 ms, p99 ≤ 50 ms).
    Create(create::CreateArgs),
    /// Enqueue throughput over HTTP beside the in-process floor (target ≥ 70 % of it).
    Throughput(throughput::ThroughputArgs),
    /// Drain rate of a queued backlog (target ≥ 5,000 operations/s).
    Backlog(backlog::BacklogArgs),
    /// Page times of the operator dashboard over 10,000 capsules and 100,000 operations.
    Dashboard(dashboard::DashboardArgs),
    /// Baseline: pickup and backlog drain of apalis-redis 1.0 with a no-op handler.
    Apalis(apalis::ApalisArgs),
    /// Real microVMs (qemu driver): restore → ready, exec, snapshot, cold boot, RSS (targets:
    /// restore p50 ≤ 400 ms, snapshot ≤ 100 ms, exec p50 ≤ 10 ms). Needs the guest image.
    Vm(vm::VmArgs),
    /// Every benchmark above except `vm`, with its defaults.
    All,
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let common = &cli.common;
    match cli.command {
        Bench::Pickup(args) => pickup::run(common, &args).await,
        Bench::Create(args) => create::run(common, &args).await,
        Bench::Throughput(args) => throughput::run(common, &args).await,
        Bench::Backlog(args) => backlog::run(common, &args).await,
        Bench::Dashboard(args) => dashboard::run(common, &args).await,
        Bench::Apalis(args) => apalis::run(common, &args).await,
        Bench::Vm(args) => vm::run(&args).await,
        Bench::All => {
            let parse = |args: &[&str]| Cli::parse_from(args).command;
            for name in [
                "pickup",
                "create",
                "throughput",
                "backlog",
                "dashboard",
                "apalis",
            ] {
                let command = parse(&["hangar-bench", name]);
                Box::pin(run(Cli {
                    common: common.clone(),
                    command,
                }))
                .await?;
            }
            Ok(())
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // On Ctrl-C or SIGTERM the benchmark future is dropped, which kills its processes.
    tokio::select! {
        result = run(cli) => result,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
        _ = term.recv() => anyhow::bail!("terminated"),
    }
}
