//! The transport alone, for comparison with the apalis baseline: Hangar's Redis streams
//! (`JobQueue`) with a no-op consumer that reads and acks as the worker's runner does, in
//! process, without Postgres.

use std::time::{Duration, Instant};

use chrono::Utc;
use hangar_jobs::keys::random_hex;
use hangar_jobs::queue::JobQueue;
use hangar_jobs::{OperationId, OperationKind};

const KIND: OperationKind = OperationKind::Create;

async fn queue(url: &str) -> anyhow::Result<JobQueue> {
    let queue = JobQueue::connect(url, &format!("bench-streams-{}", random_hex(4))).await?;
    queue.ensure_groups().await?;
    Ok(queue)
}

/// Idle push → entry delivered to a consumer parked in its blocking read (ms).
pub async fn pickup(url: &str, samples: usize, gap: Duration) -> anyhow::Result<Vec<f64>> {
    let queue = queue(url).await?;
    let mut consumer = queue
        .consumer(KIND, "bench", Duration::from_secs(2))
        .await?;
    let reader = tokio::spawn(async move {
        let mut delivered = Vec::new();
        while delivered.len() < samples + 1 {
            let batch = consumer.next_batch(1).await?;
            delivered.extend(batch.iter().map(|_| Utc::now().timestamp_micros()));
        }
        anyhow::Ok(delivered)
    });
    let mut pushed = Vec::new();
    for _ in 0..=samples {
        tokio::time::sleep(gap).await;
        pushed.push(Utc::now().timestamp_micros());
        queue.push(KIND, OperationId::new()).await?;
    }
    let delivered = reader.await??;
    // The first sample is the consumer's first read: left out.
    Ok(pushed
        .iter()
        .zip(&delivered)
        .skip(1)
        .map(|(p, d)| (d - p) as f64 / 1000.0)
        .collect())
}

/// `jobs` entries pushed first, then drained by `concurrency`-sized batches, each entry
/// acked on its own; returns the drain rate (entries/s).
pub async fn drain(url: &str, jobs: usize, concurrency: usize) -> anyhow::Result<f64> {
    let queue = queue(url).await?;
    let ids: Vec<_> = (0..jobs).map(|_| (KIND, OperationId::new())).collect();
    for chunk in ids.chunks(1_000) {
        queue.push_many(chunk).await?;
    }
    let mut consumer = queue
        .consumer(KIND, "bench", Duration::from_secs(2))
        .await?;
    let start = Instant::now();
    let mut done = 0;
    while done < jobs {
        let batch = consumer.next_batch(concurrency).await?;
        anyhow::ensure!(!batch.is_empty(), "stream drained early at {done}");
        let acks = batch.iter().map(|d| queue.ack(KIND, &d.entry_id));
        for r in futures::future::join_all(acks).await {
            r?;
        }
        done += batch.len();
    }
    Ok(jobs as f64 / start.elapsed().as_secs_f64())
}
