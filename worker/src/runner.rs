//! The job handler of the apalis workers, one worker per job kind, each reading its Redis
//! stream through [`hangar_jobs::backend::JobStream`] and running up to `concurrency` jobs.
//!
//! For each delivery the runner claims the operation in Postgres (a conditional update with
//! a lease), runs attempts with exponential backoff and jitter while they are transient and
//! the operation has attempts left, and acknowledges the entry once the operation is settled.
//! A delivery whose operation is terminal or held by a live lease elsewhere is acked and
//! dropped: duplicates are harmless.

use std::collections::HashMap;
use std::time::Duration;

use apalis::prelude::Data;

use backon::{BackoffBuilder, ExponentialBuilder};
use hangar_jobs::OperationKind;
use hangar_jobs::backend::{Deliveries, Slotted, StreamSettings};
use hangar_jobs::queue::Delivery;
use hangar_jobs::store::{Operation, operations};
use tracing::{Instrument, error, info, warn};

use crate::WorkerConfig;
use crate::context::JobContext;
use crate::jobs::{self, JobError, JobResult};
use crate::metrics::Outcome;

/// The handler of every job worker: settles the task's deliveries and acknowledges them.
/// A delivery's slot is freed when it settles, so the backend can read more meanwhile.
pub async fn run_task(deliveries: Deliveries, ctx: Data<JobContext>) {
    let Deliveries(mut slotted) = deliveries;
    if slotted.len() > 1 && slotted.iter().all(|s| jobs::runs_batched(s.delivery.kind)) {
        run_batch(&ctx, slotted).await;
        return;
    }
    // The backend hands out one delivery per task for kinds that do not run batched.
    let runs = slotted.drain(..).map(|Slotted { delivery, slot }| {
        let ctx = &ctx;
        async move {
            // An unsettled delivery stays pending on the stream and is reclaimed later.
            if run_delivery(ctx, &delivery).await {
                ack(ctx, &[&delivery]).await;
            }
            drop(slot);
        }
    });
    futures::future::join_all(runs).await;
}

/// How the worker of `kind` reads its stream: a slot per job it may run, reads that park up
/// to 2 s (bounding how late a stop is seen), and entries another worker held past two
/// leases taken over once per lease.
pub fn stream_settings(config: &WorkerConfig, kind: OperationKind) -> StreamSettings {
    StreamSettings {
        concurrency: config.concurrency,
        block: Duration::from_secs(2),
        reclaim_every: config.lease(),
        reclaim_idle: config.lease() * 2,
        batched: jobs::runs_batched(kind),
    }
}

/// Acknowledges settled deliveries of one stream.
async fn ack(ctx: &JobContext, settled: &[&Delivery]) {
    let Some(first) = settled.first() else { return };
    let ids: Vec<&str> = settled.iter().map(|d| d.entry_id.as_str()).collect();
    if let Err(error) = ctx.queue.ack_many(first.kind, &ids).await {
        // The entries will be reclaimed and found settled: harmless.
        warn!(%error, "ack failed");
    }
}

/// Settles one delivery: claim, attempt, back off, retry, finish. Returns false when the
/// operation could not even be claimed (Postgres unreachable): the entry must not be acked.
pub async fn run_delivery(ctx: &JobContext, delivery: &Delivery) -> bool {
    let Some(op_id) = delivery.operation_id else {
        warn!(entry = %delivery.entry_id, "dropping a malformed job entry");
        return true;
    };
    loop {
        let op = match claim(ctx, op_id).await {
            Ok(Some(op)) => op,
            Ok(None) => return true, // terminal, or another worker holds it
            Err(error) => {
                warn!(%error, operation_id = %op_id, "claim failed; the job stays pending and will be redelivered");
                return false;
            }
        };
        let outcome = async {
            let result = jobs::execute(ctx, &op).await;
            settle(ctx, &op, result).await
        };
        match outcome.instrument(jobs::span(&op)).await {
            Some(delay) => tokio::time::sleep(delay).await,
            None => return true,
        }
    }
}

/// Records an attempt's outcome; returns the delay after which to attempt again, if any.
async fn settle(ctx: &JobContext, op: &Operation, result: JobResult) -> Option<Duration> {
    match result {
        Ok(()) => {
            ctx.metrics.finished(op, Outcome::Succeeded);
            None
        }
        Err(error) => handle_failure(ctx, op, error).await,
    }
}

/// Settles a batch of deliveries of a kind that [`jobs::runs_batched`]: one claim for all,
/// one attempt of all together, one ack for the settled. An operation whose attempt failed
/// continues alone, as in [`run_delivery`], and frees its slot when it settles.
async fn run_batch(ctx: &JobContext, slotted: Vec<Slotted>) {
    let mut by_op = HashMap::with_capacity(slotted.len());
    let mut settled = Vec::new();
    for Slotted { delivery, slot } in slotted {
        match delivery.operation_id {
            Some(op_id) => {
                by_op.insert(op_id, (delivery, slot));
            }
            None => {
                warn!(entry = %delivery.entry_id, "dropping a malformed job entry");
                settled.push(delivery);
            }
        }
    }
    let ids: Vec<uuid::Uuid> = by_op.keys().map(|id| id.0).collect();
    let claimed = match ctx.pool.acquire().await {
        Ok(mut conn) => {
            let lease = ctx.config.lease().as_secs_f64();
            operations::claim_many(&mut conn, &ids, &ctx.worker, lease).await
        }
        Err(error) => Err(error.into()),
    };
    let ops = match claimed {
        Ok(ops) => ops,
        Err(error) => {
            // Nothing acked: the entries stay pending and are reclaimed later.
            warn!(%error, count = ids.len(), "batch claim failed; the jobs will be redelivered");
            ack(ctx, &settled.iter().collect::<Vec<_>>()).await;
            return;
        }
    };
    let mut spans = jobs::Spans::with_capacity(ops.len());
    for op in &ops {
        ctx.metrics.claimed(op);
        spans.insert(op.id, jobs::span(op));
    }
    let outcomes = jobs::execute_batch(ctx, ops, &spans).await;
    let mut retries = Vec::new();
    for (op, outcome) in outcomes {
        let Some((delivery, slot)) = by_op.remove(&op.id) else {
            continue;
        };
        // The attempt's span ends once it is settled (here on success, below on failure).
        let span = spans.remove(&op.id).unwrap_or_else(tracing::Span::none);
        match outcome {
            Ok(()) => {
                ctx.metrics.finished(&op, Outcome::Succeeded);
                settled.push(delivery);
            }
            Err(error) => retries.push(async move {
                let retry = handle_failure(ctx, &op, error).instrument(span).await;
                if let Some(delay) = retry {
                    tokio::time::sleep(delay).await;
                }
                if retry.is_none() || run_delivery(ctx, &delivery).await {
                    ack(ctx, &[&delivery]).await;
                }
                drop(slot);
            }),
        }
    }
    // What is left was not claimed: terminal, or held by another worker.
    settled.extend(by_op.into_values().map(|(delivery, _)| delivery));
    ack(ctx, &settled.iter().collect::<Vec<_>>()).await;
    futures::future::join_all(retries).await;
}

async fn claim(
    ctx: &JobContext,
    op_id: hangar_jobs::OperationId,
) -> Result<Option<Operation>, hangar_jobs::store::StoreError> {
    let mut conn = ctx.pool.acquire().await?;
    let op = operations::claim(
        &mut conn,
        op_id,
        &ctx.worker,
        ctx.config.lease().as_secs_f64(),
    )
    .await?;
    if let Some(op) = &op {
        ctx.metrics.claimed(op);
    }
    Ok(op)
}

/// Applies the retry policy to a failed attempt. Returns the delay before the next attempt,
/// or `None` when the operation is settled (or no longer ours).
async fn handle_failure(ctx: &JobContext, op: &Operation, error: JobError) -> Option<Duration> {
    let settled = match &error {
        JobError::Transient(message) if op.attempts < op.max_attempts => {
            let delay = backoff_delay(ctx, op.attempts);
            warn!(attempt = op.attempts, max = op.max_attempts, ?delay, %message, "transient failure; retrying");
            let hold = (delay + ctx.config.lease()).as_secs_f64();
            let mut conn = match ctx.pool.acquire().await {
                Ok(c) => c,
                Err(_) => return None,
            };
            match operations::mark_retrying(&mut conn, op.id, &ctx.worker, message, hold).await {
                Ok(true) => {
                    ctx.metrics.retried(op);
                    return Some(delay);
                }
                Ok(false) => return None, // lease lost: someone else has it
                Err(e) => Err(e),
            }
        }
        JobError::Transient(message) => {
            let message = format!("gave up after {} attempts: {message}", op.attempts);
            error!(%message, "operation failed");
            let failed = jobs::fail(ctx, op, "attempts_exhausted", &message).await;
            failed.inspect(|()| ctx.metrics.finished(op, Outcome::Failed))
        }
        JobError::Permanent { code, message } => {
            error!(%code, %message, "operation failed");
            let failed = jobs::fail(ctx, op, code, message).await;
            failed.inspect(|()| ctx.metrics.finished(op, Outcome::Failed))
        }
        JobError::Stale(reason) => {
            info!(%reason, "operation superseded; nothing done");
            let superseded = jobs::supersede(ctx, op, reason).await;
            superseded.inspect(|()| ctx.metrics.finished(op, Outcome::Cancelled))
        }
        JobError::Deferred => {
            let mut conn = match ctx.pool.acquire().await {
                Ok(c) => c,
                Err(_) => return None,
            };
            operations::requeue(&mut conn, op.id, &ctx.worker)
                .await
                .map(|_| ())
        }
    };
    if let Err(error) = settled {
        warn!(%error, "could not settle the operation; its lease will expire and it will run again");
    }
    None
}

/// Exponential backoff with jitter for the `attempt`-th failure.
fn backoff_delay(ctx: &JobContext, attempt: i32) -> Duration {
    ExponentialBuilder::default()
        .with_min_delay(ctx.config.retry_base())
        .with_max_delay(ctx.config.retry_cap())
        .with_jitter()
        .without_max_times()
        .build()
        .nth((attempt.max(1) - 1) as usize)
        .unwrap_or(ctx.config.retry_cap())
}
