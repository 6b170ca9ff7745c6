//! `backlog`: N creates queued with no worker running (intents in batches of 1,000 per
//! transaction, pushed with `JobQueue::push_many` through `enqueue::push_committed`), then
//! worker processes start beside a zero-latency agent and the drain rate is measured:
//! overall, and per 1 s window of `finished_at` (minimum window, windows without progress).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use chrono::{DateTime, Utc};
use clap::Args;
use hangar_jobs::{OperationKind, enqueue, intents};

use crate::cluster::{Cluster, Common};
use crate::stages::ms;
use crate::stats::Summary;

#[derive(Args, Debug, Clone)]
pub struct BacklogArgs {
    /// Creates queued before the workers start.
    #[arg(long, default_value_t = 100_000)]
    pub jobs: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// `HANGAR_WORKER_CONCURRENCY` of each worker.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Zero-latency sim agents (placement spreads the capsules over them).
    #[arg(long, default_value_t = 1)]
    pub agents: usize,
    /// Intents per transaction while queueing.
    #[arg(long, default_value_t = 1_000)]
    pub batch: usize,
    /// Give up when nothing finishes for this long.
    #[arg(long, default_value_t = 120)]
    pub stall_secs: u64,
}

async fn queue_backlog(cluster: &Arc<Cluster>, args: &BacklogArgs) -> anyhow::Result<()> {
    let batches = args.jobs.div_ceil(args.batch);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (cluster, next, args) = (cluster.clone(), next.clone(), args.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let b = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if b >= batches {
                    return anyhow::Ok(());
                }
                let size = args.batch.min(args.jobs - b * args.batch);
                let mut tx = cluster.pool.begin().await?;
                let mut jobs = Vec::with_capacity(size);
                for _ in 0..size {
                    let accepted =
                        intents::create_capsule(&mut tx, cluster.create_request()).await?;
                    jobs.push((OperationKind::Create, accepted.operation.id));
                }
                tx.commit().await?;
                ensure!(
                    enqueue::push_committed(&cluster.pool, &cluster.queue, &jobs).await,
                    "push failed"
                );
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

async fn count(cluster: &Cluster, status: &str) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("select count(*) from operations where status = $1")
            .bind(status)
            .fetch_one(&cluster.pool)
            .await?,
    )
}

pub async fn run(common: &Common, args: &BacklogArgs) -> anyhow::Result<()> {
    let mut cluster = Cluster::start(common, "backlog", 8).await?;
    for a in 0..args.agents {
        cluster.spawn_agent(&format!("agent-{a}")).await?;
    }
    let cluster_arc = Arc::new(cluster);
    let setup = Instant::now();
    queue_backlog(&cluster_arc, args).await?;
    let setup = setup.elapsed().as_secs_f64();
    let mut cluster = Arc::into_inner(cluster_arc).expect("tasks are done");
    let depth = cluster.queue.depth(OperationKind::Create).await?;
    ensure!(
        depth == args.jobs as u64,
        "stream holds {depth} entries, expected {}",
        args.jobs
    );
    eprintln!(
        "queued {} creates in {setup:.1} s ({:.0}/s); starting {} workers",
        args.jobs,
        args.jobs as f64 / setup,
        args.workers
    );

    // Let the set-up's statistics reach Postgres' counters first.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cpu_before = cluster.cpu().await;
    let db_before = db_stats(&cluster).await?;
    let spawned = Utc::now();
    for w in 0..args.workers {
        cluster.spawn_worker(&format!("worker-{w}"), args.concurrency)?;
    }
    let n = args.jobs as i64;
    let mut last = (0, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        cluster.check_alive()?;
        let done = count(&cluster, "succeeded").await? + count(&cluster, "failed").await?;
        if done != last.0 {
            last = (done, Instant::now());
        }
        if done >= n {
            break;
        }
        ensure!(
            last.1.elapsed() < Duration::from_secs(args.stall_secs),
            "stalled: {done} of {n} done, no progress for {} s; logs: {}",
            args.stall_secs,
            cluster.dir.display()
        );
    }
    let cpu = crate::cpu::describe(&cluster.cpu().await, &cpu_before);
    // Backends report their statistics within a second or so of their last transaction.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let db_after = db_stats(&cluster).await?;
    let failed = count(&cluster, "failed").await?;
    let finished: Vec<(DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "select started_at, finished_at from operations
         where status = 'succeeded' and kind = 'create' order by finished_at",
    )
    .fetch_all(&cluster.pool)
    .await?;
    let succeeded = finished.len();
    let first_start = finished.iter().map(|r| r.0).min().unwrap_or(spawned);
    let first_finish = finished.first().map_or(spawned, |r| r.1);
    let last_finish = finished.last().map_or(spawned, |r| r.1);
    let windows = windows(
        &finished.iter().map(|r| r.1).collect::<Vec<_>>(),
        first_finish,
    );
    // The last window is partial; leave it out of the spread unless it is the only one.
    let full = if windows.len() > 1 {
        &windows[..windows.len() - 1]
    } else {
        &windows[..]
    };
    let stalls = full.iter().filter(|w| **w == 0.0).count();
    let span_spawn = ms(spawned, last_finish) / 1000.0;
    let span_run = ms(first_start, last_finish) / 1000.0;
    let repushed = entries_added(&cluster)
        .await?
        .saturating_sub(args.jobs as i64);
    let running: i64 = sqlx::query_scalar("select count(*) from capsules where status = 'running'")
        .fetch_one(&cluster.pool)
        .await?;

    let w = Summary::of(full).expect("at least one window");
    let run_ms: Vec<f64> = finished.iter().map(|r| ms(r.0, r.1)).collect();
    let run = Summary::of(&run_ms).expect("at least one operation");
    println!();
    println!(
        "### backlog: {} queued creates drained by {} worker process(es) × concurrency {}, {} zero-latency sim agent(s)",
        args.jobs, args.workers, args.concurrency, args.agents
    );
    println!();
    println!("| measure | value |");
    println!("|---|---:|");
    println!(
        "| **drain rate**, first claim → last finish | **{:.0} ops/s** ({succeeded} in {span_run:.1} s; target ≥ 5,000: {}) |",
        succeeded as f64 / span_run,
        if succeeded as f64 / span_run >= 5000.0 {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "| drain rate, worker spawn → last finish | {:.0} ops/s ({span_spawn:.1} s) |",
        succeeded as f64 / span_spawn
    );
    println!(
        "| worker spawn → first finish | {:.2} s |",
        ms(spawned, first_finish) / 1000.0
    );
    println!(
        "| 1 s windows: min / p25 / p50 / p75 / max | {:.0} / {:.0} / {:.0} / {:.0} / {:.0} ops/s (n = {}) |",
        w.min, w.p25, w.p50, w.p75, w.max, w.n
    );
    println!("| windows with zero progress (stall) | {stalls} |");
    println!(
        "| job run (`started_at` → `finished_at`): p50 / p99 / max | {:.1} / {:.1} / {:.1} ms |",
        run.p50, run.p99, run.max
    );
    println!("| succeeded / failed | {succeeded} / {failed} |");
    println!("| capsules running at the end | {running} |");
    println!("| stream entries beyond N (reconciler re-pushes) | {repushed} |");
    println!(
        "| queueing the backlog (setup, 2 tasks) | {:.0} intents/s |",
        args.jobs as f64 / setup
    );
    println!();
    let line: Vec<String> = windows.iter().map(|r| format!("{r:.0}")).collect();
    println!("per-second drain (ops/s): {}", line.join(" "));
    println!("CPU during the drain: {cpu}");
    let per = |i: usize| (db_after[i] - db_before[i]) as f64 / n as f64;
    println!(
        "Postgres per operation: {:.1} commits, {:.1} rows inserted, {:.1} updated ({:.1} HOT), {:.1} fetched, {:.1} index/seq scans",
        per(0),
        per(1),
        per(2),
        per(3),
        per(4),
        per(5)
    );
    println!("logs: {}", cluster.dir.display());
    Ok(())
}

/// This database's commits, rows inserted, updated, HOT-updated, fetched, and scans.
async fn db_stats(cluster: &Cluster) -> anyhow::Result<[i64; 6]> {
    let (commits, fetched): (i64, i64) = sqlx::query_as(
        "select xact_commit, tup_fetched from pg_stat_database where datname = current_database()",
    )
    .fetch_one(&cluster.pool)
    .await?;
    let (ins, upd, hot, scans): (i64, i64, i64, i64) = sqlx::query_as(
        "select coalesce(sum(n_tup_ins), 0)::int8, coalesce(sum(n_tup_upd), 0)::int8,
                coalesce(sum(n_tup_hot_upd), 0)::int8,
                coalesce(sum(coalesce(idx_scan, 0) + seq_scan), 0)::int8
         from pg_stat_user_tables",
    )
    .fetch_one(&cluster.pool)
    .await?;
    Ok([commits, ins, upd, hot, fetched, scans])
}

/// Entries ever added to the create stream (`XINFO STREAM` `entries-added`, Redis 7+).
async fn entries_added(cluster: &Cluster) -> anyhow::Result<i64> {
    let info: HashMap<String, redis::Value> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(cluster.queue.stream_key(OperationKind::Create))
        .query_async(&mut cluster.queue.connection())
        .await?;
    match info.get("entries-added") {
        Some(redis::Value::Int(n)) => Ok(*n),
        _ => Ok(-1),
    }
}

/// Operations finished in each whole second after `from`.
fn windows(finished: &[DateTime<Utc>], from: DateTime<Utc>) -> Vec<f64> {
    let mut out: Vec<f64> = Vec::new();
    for t in finished {
        let i = (ms(from, *t) / 1000.0).floor().max(0.0) as usize;
        if out.len() <= i {
            out.resize(i + 1, 0.0);
        }
        out[i] += 1.0;
    }
    out
}
