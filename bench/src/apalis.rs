//! `apalis`: the baseline Hangar's queue replaced — apalis-redis 1.0 with a no-op handler, on
//! the same Redis. Pickup latency (push → handler start, the worker idle in between) with the
//! default config and with `heartbeat_interval(1 s)`, and whether queued backlogs drain.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use apalis::prelude::*;
use apalis_redis::{Config, RedisStorage};
use chrono::Utc;
use clap::Args;
use hangar_jobs::keys::random_hex;
use tokio::sync::mpsc;

use crate::cluster::Common;
use crate::stats;

#[derive(Args, Debug, Clone)]
pub struct ApalisArgs {
    /// Pickup samples with the default config (30 s heartbeat: each may take that long).
    #[arg(long, default_value_t = 10)]
    pub default_samples: usize,
    /// Pickup samples with `heartbeat_interval(1 s)`.
    #[arg(long, default_value_t = 100)]
    pub fast_samples: usize,
    /// Pause between pickup samples (the worker idle).
    #[arg(long, default_value_t = 20)]
    pub gap_ms: u64,
    /// Backlog sizes to queue before the worker starts.
    #[arg(long, value_delimiter = ',', default_value = "5000,8500")]
    pub backlogs: Vec<usize>,
    /// Handler concurrency of the backlog worker.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Give a backlog up after this long without progress.
    #[arg(long, default_value_t = 30)]
    pub stall_secs: u64,
}

/// The handler: reports when it ran (µs since the epoch) and does nothing else.
async fn noop(
    pushed_us: i64,
    done: Data<mpsc::UnboundedSender<(i64, i64)>>,
) -> Result<(), BoxDynError> {
    let _ = done.send((pushed_us, Utc::now().timestamp_micros()));
    Ok(())
}

async fn storage(url: &str, heartbeat: Option<Duration>) -> anyhow::Result<RedisStorage<i64>> {
    let conn = apalis_redis::connect(url).await?;
    let mut config = Config::default().queue(format!("bench-apalis-{}", random_hex(4)));
    if let Some(h) = heartbeat {
        config = config.heartbeat_interval(h);
    }
    Ok(RedisStorage::new(conn).with_config(config))
}

type Finished = mpsc::UnboundedReceiver<(i64, i64)>;

/// Starts a worker on `storage`'s queue; its result comes out of the handle.
fn start_worker(
    storage: &RedisStorage<i64>,
    concurrency: usize,
) -> (tokio::task::JoinHandle<Result<(), String>>, Finished) {
    let (tx, rx) = mpsc::unbounded_channel();
    let worker = WorkerBuilder::new(format!("bench-{}", random_hex(4)))
        .backend(storage.clone())
        .concurrency(concurrency)
        .data(tx)
        .build(noop);
    let handle = tokio::spawn(async move { worker.run().await.map_err(|e| e.to_string()) });
    (handle, rx)
}

async fn pickup(
    url: &str,
    heartbeat: Option<Duration>,
    samples: usize,
    gap: Duration,
) -> anyhow::Result<(Vec<f64>, usize)> {
    let mut storage = storage(url, heartbeat).await?;
    let (worker, mut done) = start_worker(&storage, 1);
    let limit = heartbeat.unwrap_or(Duration::from_secs(30)) + Duration::from_secs(10);
    let mut out = Vec::with_capacity(samples);
    let mut missed = 0;
    // A push lands at a random phase of the heartbeat cycle, as real traffic would (a fixed
    // pause after each pickup would always land just after a heartbeat).
    let cycle = heartbeat.unwrap_or(Duration::from_secs(30)).as_millis();
    // One unmeasured job first: the worker registers and goes idle.
    storage.push(Utc::now().timestamp_micros()).await?;
    tokio::time::timeout(limit, done.recv())
        .await
        .context("apalis worker never ran the first job")?;
    for _ in 0..samples {
        let phase = Duration::from_millis((uuid::Uuid::new_v4().as_u128() % cycle) as u64);
        tokio::time::sleep(gap + phase).await;
        storage.push(Utc::now().timestamp_micros()).await?;
        match tokio::time::timeout(limit, done.recv()).await {
            Ok(Some((pushed, ran))) => out.push((ran - pushed) as f64 / 1000.0),
            _ => missed += 1,
        }
    }
    worker.abort();
    Ok((out, missed))
}

struct Drain {
    queued: usize,
    done: usize,
    secs: f64,
    error: Option<String>,
}

async fn backlog(url: &str, jobs: usize, args: &ApalisArgs) -> anyhow::Result<Drain> {
    let mut storage = storage(url, Some(Duration::from_secs(1))).await?;
    for chunk in (0..jobs).collect::<Vec<_>>().chunks(500) {
        storage
            .push_bulk(chunk.iter().map(|_| 0i64).collect())
            .await?;
    }
    let start = Instant::now();
    let (worker, mut finished) = start_worker(&storage, args.concurrency);
    let done = Arc::new(AtomicUsize::new(0));
    let mut last = (0, Instant::now());
    let mut error = None;
    let mut closed = false;
    while done.load(Ordering::Relaxed) < jobs {
        match tokio::time::timeout(Duration::from_millis(200), finished.recv()).await {
            Ok(Some(_)) => {
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                last = (n, Instant::now());
            }
            Ok(None) => {
                closed = true;
                break;
            }
            Err(_) => {}
        }
        if worker.is_finished() {
            break;
        }
        if last.1.elapsed() > Duration::from_secs(args.stall_secs) {
            error = Some(format!("no job ran for {} s", args.stall_secs));
            break;
        }
    }
    let secs = last.1.duration_since(start).as_secs_f64();
    if closed || worker.is_finished() {
        // The worker ended (its handler data, the sender, is gone): why?
        error = Some(
            match tokio::time::timeout(Duration::from_secs(5), worker).await {
                Ok(Ok(Ok(()))) => "worker stopped".into(),
                Ok(Ok(Err(e))) => format!("worker stopped: {e}"),
                Ok(Err(e)) => format!("worker task: {e}"),
                Err(_) => "worker stopped handling jobs".into(),
            },
        );
    } else {
        worker.abort();
    }
    Ok(Drain {
        queued: jobs,
        done: done.load(Ordering::Relaxed),
        secs,
        error,
    })
}

pub async fn run(common: &Common, args: &ApalisArgs) -> anyhow::Result<()> {
    let url = common.redis_url.clone().context("REDIS_URL is not set")?;
    let gap = Duration::from_millis(args.gap_ms);
    let (default, default_missed) = pickup(&url, None, args.default_samples, gap).await?;
    let one_sec = Some(Duration::from_secs(1));
    let (fast, fast_missed) = pickup(&url, one_sec, args.fast_samples, gap).await?;
    stats::latency_header("apalis-redis 1.0 baseline: idle push → no-op handler start (1 worker)");
    stats::latency_row(
        "default config (heartbeat 30 s)",
        &default,
        &stats::verdict(&default, 5.0, 25.0),
    );
    stats::latency_row(
        "`heartbeat_interval(1 s)`",
        &fast,
        &stats::verdict(&fast, 5.0, 25.0),
    );
    let streams = crate::streams::pickup(&url, args.fast_samples, gap).await?;
    stats::latency_row(
        "Hangar's streams (`JobQueue`), same no-op, for comparison",
        &streams,
        &stats::verdict(&streams, 5.0, 25.0),
    );
    println!();
    println!(
        "samples without pickup within heartbeat + 10 s: default {default_missed}, 1 s {fast_missed}"
    );
    println!();
    println!(
        "| apalis backlog (heartbeat 1 s, concurrency {}) | ran | drain rate | outcome |",
        args.concurrency
    );
    println!("|---:|---:|---:|---|");
    for &jobs in &args.backlogs {
        let d = backlog(&url, jobs, args).await?;
        let rate = if d.secs > 0.0 {
            d.done as f64 / d.secs
        } else {
            0.0
        };
        let outcome = match (&d.error, d.done == d.queued) {
            (_, true) => "drained".to_owned(),
            (Some(e), false) => format!("STALLED: {e}"),
            (None, false) => "STALLED".to_owned(),
        };
        println!(
            "| {} queued | {} | {rate:.0} jobs/s | {outcome} |",
            d.queued, d.done
        );
    }
    for &jobs in &args.backlogs {
        let rate = crate::streams::drain(&url, jobs, args.concurrency).await?;
        println!(
            "| {jobs} queued, Hangar's streams (no-op, in-process) | {jobs} | {rate:.0} jobs/s | drained |"
        );
    }
    Ok(())
}
