//! `pickup`: idle enqueue → worker pickup latency. An intent is committed, `t0` is taken,
//! the job is pushed as the API pushes it, and the pickup is the operation's `started_at`
//! (Postgres `now()` of the worker's claim) minus `t0`. The worker is idle before each
//! sample (a pause between samples).

use std::time::Duration;

use chrono::Utc;
use clap::Args;

use crate::cluster::{Cluster, Common};
use crate::stages::ms;
use crate::stats;

#[derive(Args, Debug, Clone)]
pub struct PickupArgs {
    /// Measured samples.
    #[arg(long, default_value_t = 300)]
    pub samples: usize,
    /// Samples run first and not counted (the worker's first read, cold pools).
    #[arg(long, default_value_t = 20)]
    pub warmup: usize,
    /// Pause between samples, so the worker is idle (parked in its blocking read).
    #[arg(long, default_value_t = 20)]
    pub gap_ms: u64,
    /// Job slots of the worker (`HANGAR_WORKER_CONCURRENCY`).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
}

pub async fn run(common: &Common, args: &PickupArgs) -> anyhow::Result<()> {
    let mut cluster = Cluster::start(common, "pickup", 4).await?;
    cluster.spawn_agent("agent-1").await?;
    cluster.spawn_worker("worker-1", args.concurrency)?;

    let mut pickup = Vec::with_capacity(args.samples);
    let mut push = Vec::with_capacity(args.samples);
    let mut job = Vec::with_capacity(args.samples);
    let mut total = Vec::with_capacity(args.samples);
    let mut failed = 0;
    let mut retried = 0;
    for i in 0..args.warmup + args.samples {
        let id = cluster.write_intent().await?;
        let t0 = Utc::now();
        cluster.push(id).await?;
        // The first sample waits for the worker process to start.
        let limit = Duration::from_secs(if i == 0 { 60 } else { 20 });
        let status = cluster.wait_operation(id, limit).await?;
        let s = cluster.stages(id).await?;
        if i >= args.warmup {
            if status != "succeeded" {
                failed += 1;
            }
            if s.attempts > 1 {
                retried += 1;
            }
            if let (Some(pushed), Some(started), Some(finished)) =
                (s.pushed_at, s.started_at, s.finished_at)
            {
                pickup.push(ms(t0, started));
                push.push(ms(t0, pushed));
                job.push(ms(started, finished));
                total.push(ms(t0, finished));
            }
        }
        cluster.check_alive()?;
        tokio::time::sleep(Duration::from_millis(args.gap_ms)).await;
    }

    stats::latency_header(&format!(
        "pickup: idle enqueue → worker claim (1 worker, concurrency {}, zero-latency sim agent, {} ms between samples)",
        args.concurrency, args.gap_ms
    ));
    stats::latency_row(
        "**pickup** (push start t0 → `started_at`)",
        &pickup,
        &stats::verdict(&pickup, 5.0, 25.0),
    );
    stats::latency_row("t0 → `pushed_at` (XADD + mark_pushed)", &push, "");
    stats::latency_row("job run (`started_at` → `finished_at`)", &job, "");
    stats::latency_row("t0 → `finished_at`", &total, "");
    println!();
    println!(
        "failed operations: {failed}, retried: {retried}; logs: {}",
        cluster.dir.display()
    );
    Ok(())
}
