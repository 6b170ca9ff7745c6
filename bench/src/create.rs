//! `create`: `POST /v1/capsules` → capsule running, with a zero-latency sim agent.
//! Sequential requests; the server-side latency is the operation's `finished_at` minus the
//! moment the POST was sent, the client-side one ends when the `?wait=` long poll answers.

use std::time::{Duration, Instant};

use chrono::Utc;
use clap::Args;
use hangar_jobs::OperationId;
use serde_json::{Value, json};

use crate::cluster::{Cluster, Common};
use crate::stages::ms;
use crate::stats;

#[derive(Args, Debug, Clone)]
pub struct CreateArgs {
    #[arg(long, default_value_t = 300)]
    pub samples: usize,
    #[arg(long, default_value_t = 20)]
    pub warmup: usize,
    /// Pause between creates.
    #[arg(long, default_value_t = 0)]
    pub gap_ms: u64,
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
}

/// `POST /v1/capsules`; returns the operation id once answered 202.
pub async fn post_create(cluster: &Cluster) -> anyhow::Result<OperationId> {
    let resp = cluster
        .http
        .post(format!("{}/v1/capsules", cluster.api_url))
        .bearer_auth(&cluster.admin_key)
        .json(&json!({ "template": "base", "timeout_sec": 3600 }))
        .send()
        .await?;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    anyhow::ensure!(status.as_u16() == 202, "POST /v1/capsules: {status} {body}");
    let id = body["operation"]["id"].as_str().unwrap_or_default();
    Ok(id.parse()?)
}

pub async fn run(common: &Common, args: &CreateArgs) -> anyhow::Result<()> {
    let mut cluster = Cluster::start(common, "create", 4).await?;
    cluster.spawn_agent("agent-1").await?;
    cluster.spawn_worker("worker-1", args.concurrency)?;

    let mut server = Vec::new();
    let mut client = Vec::new();
    let mut accept = Vec::new();
    let mut to_row = Vec::new();
    let mut row_to_claim = Vec::new();
    let mut job = Vec::new();
    let mut notify = Vec::new();
    let mut failed = 0;
    let mut retried = 0;
    for i in 0..args.warmup + args.samples {
        let sent = Utc::now();
        let clock = Instant::now();
        let id = post_create(&cluster).await?;
        let accepted = clock.elapsed();
        let limit = Duration::from_secs(if i == 0 { 60 } else { 20 });
        let status = cluster.wait_operation(id, limit).await?;
        let answered = clock.elapsed();
        let answered_at = Utc::now();
        let s = cluster.stages(id).await?;
        if i >= args.warmup {
            if status != "succeeded" {
                failed += 1;
            }
            if s.attempts > 1 {
                retried += 1;
            }
            if let (Some(started), Some(finished)) = (s.started_at, s.finished_at) {
                server.push(ms(sent, finished));
                client.push(answered.as_secs_f64() * 1000.0);
                accept.push(accepted.as_secs_f64() * 1000.0);
                to_row.push(ms(sent, s.created_at));
                row_to_claim.push(ms(s.created_at, started));
                job.push(ms(started, finished));
                notify.push(ms(finished, answered_at));
            }
        }
        cluster.check_alive()?;
        if args.gap_ms > 0 {
            tokio::time::sleep(Duration::from_millis(args.gap_ms)).await;
        }
    }

    stats::latency_header(&format!(
        "create → running over HTTP (sequential, 1 worker, concurrency {}, zero-latency sim agent)",
        args.concurrency
    ));
    stats::latency_row(
        "**create → running** (POST sent → `finished_at`)",
        &server,
        &stats::verdict(&server, 15.0, 50.0),
    );
    stats::latency_row("client: POST sent → `?wait=` answer", &client, "");
    stats::latency_row("  POST sent → 202 received", &accept, "");
    stats::latency_row("  POST sent → tx start (`created_at`)", &to_row, "");
    stats::latency_row("  `created_at` → claim (`started_at`)", &row_to_claim, "");
    stats::latency_row("  job run (`started_at` → `finished_at`)", &job, "");
    stats::latency_row("  `finished_at` → long poll answered", &notify, "");
    println!();
    println!(
        "failed operations: {failed}, retried: {retried}; logs: {}",
        cluster.dir.display()
    );
    Ok(())
}
