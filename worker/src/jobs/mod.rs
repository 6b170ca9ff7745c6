//! The jobs: one function per operation kind, and the shared ways a job ends.
//!
//! A job runs for a claimed operation (see `runner`). It checks that the capsule is still
//! where the operation left it (status and generation), calls the host agent, and commits
//! the capsule transition, the operation's result and an event in one transaction.

mod create;
mod create_batch;
mod destroy;
mod host_event;
mod lifecycle;
mod snapshot;

use std::collections::HashMap;

use hangar_jobs::agents::{AgentClient, AgentError};
use hangar_jobs::enqueue;
use hangar_jobs::store::operations::{self, Outcome};
use hangar_jobs::store::records::{self, NewEvent};
use hangar_jobs::store::{self, Capsule, Host, Operation, StoreError, capsules};
use hangar_jobs::{CapsuleStatus, HostId, OperationId, OperationKind, OperationStatus};
use serde_json::Value;
use tracing::warn;

use crate::context::JobContext;

/// How a job attempt failed, which decides what happens next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JobError {
    /// Retry after a backoff while attempts remain.
    #[error("{0}")]
    Transient(String),
    /// Fail the operation now; the capsule goes to `error`.
    #[error("{message}")]
    Permanent { code: &'static str, message: String },
    /// The capsule moved on (a newer generation or another status): do nothing.
    #[error("superseded: {0}")]
    Stale(String),
    /// Not yet: hand the operation back to the queue (a destroy waiting its turn).
    #[error("waiting for the capsule's in-flight operation")]
    Deferred,
}

impl From<AgentError> for JobError {
    fn from(e: AgentError) -> Self {
        match e {
            AgentError::Transient(m) => JobError::Transient(m),
            AgentError::Permanent(m) => JobError::Permanent {
                code: "agent_error",
                message: m,
            },
        }
    }
}

impl From<StoreError> for JobError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::TransitionNotAllowed { .. } => JobError::Stale(e.to_string()),
            StoreError::Database(db) => JobError::Transient(format!("database unavailable: {db}")),
        }
    }
}

impl From<sqlx::Error> for JobError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Database(e).into()
    }
}

pub type JobResult = Result<(), JobError>;

/// Whether operations of `kind` run a delivery batch at a time ([`execute_batch`]).
pub fn runs_batched(kind: OperationKind) -> bool {
    kind == OperationKind::Create
}

/// The span of one attempt of a claimed operation: every job log line carries the
/// operation, and with tracing on the attempt is a span in the trace of the request that
/// created the operation (each retry a new span in that trace).
pub fn span(op: &Operation) -> tracing::Span {
    let capsule = op.capsule_id.map(|c| c.to_string()).unwrap_or_default();
    let span = tracing::info_span!(
        "job",
        kind = %op.kind,
        operation_id = %op.id,
        capsule_id = %capsule,
        attempt = op.attempts,
    );
    hangar_proto::trace_context::set_parent(&span, op.trace_parent.as_deref());
    span
}

/// The attempt span ([`span`]) of each operation of a batch, by operation id.
pub type Spans = HashMap<OperationId, tracing::Span>;

/// Runs one attempt of each claimed operation of a batch (all of a kind that
/// [`runs_batched`]); each outcome is what [`execute`] would return for it. The work done
/// for one operation alone runs in its span from `spans`, so an attempt is one span.
pub async fn execute_batch(
    ctx: &JobContext,
    ops: Vec<Operation>,
    spans: &Spans,
) -> Vec<(Operation, JobResult)> {
    create_batch::run(ctx, ops, spans).await
}

/// Runs one attempt of a claimed operation.
pub async fn execute(ctx: &JobContext, op: &Operation) -> JobResult {
    match op.kind {
        OperationKind::Create => create::run(ctx, op).await,
        OperationKind::Pause => lifecycle::pause(ctx, op).await,
        OperationKind::Resume => lifecycle::resume(ctx, op).await,
        OperationKind::Snapshot => snapshot::run(ctx, op).await,
        OperationKind::Destroy => destroy::run(ctx, op).await,
        OperationKind::HostEvent => host_event::run(ctx, op).await,
    }
}

/// The operation's capsule, which must still be in `expected` at the operation's generation.
async fn capsule_at(
    ctx: &JobContext,
    op: &Operation,
    expected: CapsuleStatus,
) -> Result<Capsule, JobError> {
    let capsule = load_capsule(ctx, op).await?;
    if capsule.status != expected || capsule.generation != op.generation {
        return Err(JobError::Stale(format!(
            "capsule is {} at generation {}, the operation expected {expected} at {}",
            capsule.status, capsule.generation, op.generation
        )));
    }
    Ok(capsule)
}

async fn load_capsule(ctx: &JobContext, op: &Operation) -> Result<Capsule, JobError> {
    let id = op.capsule_id.ok_or_else(|| JobError::Permanent {
        code: "invalid_operation",
        message: "operation has no capsule".into(),
    })?;
    let mut conn = ctx.pool.acquire().await?;
    capsules::get(&mut conn, None, id)
        .await?
        .ok_or_else(|| JobError::Permanent {
            code: "not_found",
            message: "capsule no longer exists".into(),
        })
}

/// The host a capsule is placed on and a client to its agent.
async fn agent_for(ctx: &JobContext, capsule: &Capsule) -> Result<(Host, AgentClient), JobError> {
    let host_id = capsule.host_id.ok_or_else(|| JobError::Permanent {
        code: "not_placed",
        message: "capsule has no host".into(),
    })?;
    agent_on(ctx, host_id).await
}

/// A host and a client to its agent.
async fn agent_on(ctx: &JobContext, host_id: HostId) -> Result<(Host, AgentClient), JobError> {
    let mut conn = ctx.pool.acquire().await?;
    let host = store::hosts::get(&mut conn, host_id)
        .await?
        .ok_or_else(|| JobError::Permanent {
            code: "host_gone",
            message: "the capsule's host is no longer registered".into(),
        })?;
    let client = ctx.agents.client(&host)?;
    Ok((host, client))
}

/// Ends a successful operation: moves the capsule `capsule.status → to` (conditionally),
/// records the result and an event, in one transaction; then publishes the event.
async fn complete(
    ctx: &JobContext,
    op: &Operation,
    capsule: &Capsule,
    to: CapsuleStatus,
    result: Value,
    message: &str,
) -> JobResult {
    let mut tx = ctx.pool.begin().await?;
    let reason = (to == CapsuleStatus::Error).then_some(message);
    let moved = capsules::transition(
        &mut tx,
        capsule.id,
        capsule.status,
        capsule.generation,
        to,
        reason,
    )
    .await?
    .ok_or_else(|| JobError::Stale("capsule changed while the job ran".into()))?;
    if to == CapsuleStatus::Stopped
        && let Some(host) = moved.host_id
    {
        store::hosts::release(&mut tx, host, moved.vcpus, moved.memory_mb).await?;
    }
    let outcome = Outcome {
        status: OperationStatus::Succeeded,
        error_code: None,
        error: None,
        result: Some(result),
    };
    if !operations::finish(&mut tx, op.id, Some(&ctx.worker), outcome).await? {
        return Err(JobError::Stale("operation lease lost".into()));
    }
    let event = records::insert_event(
        &mut tx,
        NewEvent {
            team_id: moved.team_id,
            capsule_id: Some(moved.id),
            operation_id: Some(op.id),
            kind: "status_changed",
            from: Some(capsule.status),
            to: Some(to),
            message: Some(message),
        },
    )
    .await?;
    tx.commit().await?;
    enqueue::publish_event(&ctx.queue, &event).await;
    wake_waiting_destroy(ctx, op).await;
    Ok(())
}

/// Fails an operation for good. If the capsule is still in the transient status this
/// operation put it in, it moves to `error` with the reason.
pub async fn fail(
    ctx: &JobContext,
    op: &Operation,
    code: &str,
    message: &str,
) -> Result<(), StoreError> {
    let mut tx = ctx.pool.begin().await?;
    let outcome = Outcome {
        status: OperationStatus::Failed,
        error_code: Some(code),
        error: Some(message),
        result: None,
    };
    if !operations::finish(&mut tx, op.id, Some(&ctx.worker), outcome).await? {
        return Ok(());
    }
    let mut event = None;
    if let Some(capsule_id) = op.capsule_id
        && let Some(capsule) = capsules::get(&mut tx, None, capsule_id).await?
        && Some(capsule.status) == op.kind.start_status()
        && capsule.status.can_become(CapsuleStatus::Error)
    {
        let reason = format!("{} failed: {message}", op.kind);
        if capsules::transition(
            &mut tx,
            capsule.id,
            capsule.status,
            capsule.generation,
            CapsuleStatus::Error,
            Some(&reason),
        )
        .await?
        .is_some()
        {
            event = Some(
                records::insert_event(
                    &mut tx,
                    NewEvent {
                        team_id: capsule.team_id,
                        capsule_id: Some(capsule.id),
                        operation_id: Some(op.id),
                        kind: "status_changed",
                        from: Some(capsule.status),
                        to: Some(CapsuleStatus::Error),
                        message: Some(&reason),
                    },
                )
                .await?,
            );
        }
    }
    tx.commit().await?;
    if let Some(event) = event {
        enqueue::publish_event(&ctx.queue, &event).await;
    }
    wake_waiting_destroy(ctx, op).await;
    Ok(())
}

/// Ends an operation whose capsule moved on without touching the capsule.
pub async fn supersede(ctx: &JobContext, op: &Operation, reason: &str) -> Result<(), StoreError> {
    let mut conn = ctx.pool.acquire().await?;
    let outcome = Outcome {
        status: OperationStatus::Cancelled,
        error_code: Some("superseded"),
        error: Some(reason),
        result: None,
    };
    operations::finish(&mut conn, op.id, Some(&ctx.worker), outcome).await?;
    drop(conn);
    wake_waiting_destroy(ctx, op).await;
    Ok(())
}

/// A destroy queued behind this operation may run now: push it at once rather than
/// waiting for the reconciler.
async fn wake_waiting_destroy(ctx: &JobContext, op: &Operation) {
    if !op.kind.is_lifecycle() {
        return;
    }
    let Some(capsule) = op.capsule_id else { return };
    let waiting = match ctx.pool.acquire().await {
        Ok(mut conn) => operations::destroy_in_flight(&mut conn, capsule).await,
        Err(e) => Err(e.into()),
    };
    match waiting {
        Ok(Some(destroy)) => {
            enqueue::push_committed(&ctx.pool, &ctx.queue, &[(OperationKind::Destroy, destroy)])
                .await;
        }
        Ok(None) => {}
        Err(error) => {
            warn!(%error, "could not look for a waiting destroy; the reconciler will push it")
        }
    }
}
