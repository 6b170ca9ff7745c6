//! The batched path of `create`: a whole delivery batch of claimed creates is read, placed,
//! and settled with a handful of statements instead of a few transactions per capsule. The
//! agent calls still go one per capsule (concurrently), so every VM is created exactly as by
//! the single path.
//!
//! Anything off the common case (a capsule that moved on, a template gone, a placement that
//! found no room, an agent error, a completion that did not apply) goes to the single path
//! (`create::run`) or comes back as that capsule's error, so the retry policy and the
//! outcomes stay those of one job at a time.

use std::collections::HashMap;

use futures::future::join_all;
use hangar_jobs::agents::{AgentClient, AgentError};
use hangar_jobs::enqueue;
use hangar_jobs::store::completions::{self, Completion};
use hangar_jobs::store::hosts::{self, Placement};
use hangar_jobs::store::{Capsule, Host, Operation, Template, capsules, operations, tenancy};
use hangar_jobs::{CapsuleStatus, HostId, OperationId, OperationKind};
use serde_json::json;
use tracing::{Instrument, warn};

use super::create::{self, sandbox_request};
use super::{JobError, JobResult, Spans, agent_on};
use crate::context::JobContext;

/// A create ready for its agent call.
struct Ready {
    op: Operation,
    capsule: Capsule,
    template: Template,
}

/// Runs one attempt of each claimed create; returns each operation's outcome, as
/// `jobs::execute` would for it alone. The statements shared by the batch belong to no
/// operation; the agent call and the single path run in the operation's attempt span.
pub async fn run(
    ctx: &JobContext,
    ops: Vec<Operation>,
    spans: &Spans,
) -> Vec<(Operation, JobResult)> {
    let (ready, mut single) = match read(ctx, ops).await {
        Ok(split) => split,
        Err((ops, error)) => {
            let message = error.to_string();
            return ops
                .into_iter()
                .map(|op| (op, Err(JobError::Transient(message.clone()))))
                .collect();
        }
    };
    let (placed, unplaced) = place(ctx, ready).await;
    single.extend(unplaced);
    let (created, mut outcomes) = create_sandboxes(ctx, placed, spans).await;
    let (completed, leftover) = complete(ctx, created).await;
    outcomes.extend(completed);
    single.extend(leftover);
    // The uncommon cases, one by one and concurrently, through the single path.
    let singles = join_all(single.into_iter().map(|op| async move {
        let result = create::run(ctx, &op).instrument(span_of(spans, &op)).await;
        (op, result)
    }));
    outcomes.extend(singles.await);
    outcomes
}

/// The attempt span of `op` (none for an operation the runner did not open one for).
fn span_of(spans: &Spans, op: &Operation) -> tracing::Span {
    spans
        .get(&op.id)
        .cloned()
        .unwrap_or_else(tracing::Span::none)
}

/// Reads the capsules and templates of the batch; splits off the operations whose capsule
/// is not where they expect it (the single path decides what that means).
async fn read(
    ctx: &JobContext,
    ops: Vec<Operation>,
) -> Result<(Vec<Ready>, Vec<Operation>), (Vec<Operation>, JobError)> {
    let capsule_ids: Vec<uuid::Uuid> = ops
        .iter()
        .filter_map(|op| op.capsule_id)
        .map(|c| c.0)
        .collect();
    let fetched = async {
        let mut conn = ctx.pool.acquire().await?;
        let capsules = capsules::get_many(&mut conn, None, &capsule_ids).await?;
        let template_ids: Vec<uuid::Uuid> = capsules.iter().map(|c| c.template_id.0).collect();
        let templates = tenancy::get_templates(&mut conn, &template_ids).await?;
        Ok::<_, JobError>((capsules, templates))
    };
    let (capsules, templates) = match fetched.await {
        Ok(rows) => rows,
        Err(error) => return Err((ops, error)),
    };
    let mut capsules: HashMap<_, _> = capsules.into_iter().map(|c| (c.id, c)).collect();
    let templates: HashMap<_, _> = templates.into_iter().map(|t| (t.id, t)).collect();
    let mut ready = Vec::with_capacity(ops.len());
    let mut single = Vec::new();
    for op in ops {
        let capsule = op.capsule_id.and_then(|id| capsules.remove(&id));
        match capsule {
            Some(capsule)
                if capsule.status == CapsuleStatus::Starting
                    && capsule.generation == op.generation
                    && templates.contains_key(&capsule.template_id) =>
            {
                let template = templates[&capsule.template_id].clone();
                ready.push(Ready {
                    op,
                    capsule,
                    template,
                });
            }
            _ => single.push(op),
        }
    }
    Ok((ready, single))
}

/// Places the capsules that have no host yet, in one statement; those it could not place
/// (no room, or placed meanwhile by another attempt) go to the single path.
async fn place(ctx: &JobContext, mut ready: Vec<Ready>) -> (Vec<Ready>, Vec<Operation>) {
    // The same lock order in every batch: by capsule id.
    ready.sort_by_key(|r| r.capsule.id.0);
    let wanted: Vec<Placement> = ready
        .iter()
        .filter(|r| r.capsule.host_id.is_none())
        .map(|r| Placement {
            capsule: r.capsule.id,
            vcpus: r.capsule.vcpus,
            memory_mb: r.capsule.memory_mb,
            only: r.template.snapshot_host_id,
        })
        .collect();
    if wanted.is_empty() {
        return (ready, Vec::new());
    }
    let placed = async {
        let mut conn = ctx.pool.acquire().await?;
        Ok::<_, JobError>(hosts::place_many(&mut conn, &wanted).await?)
    };
    let hosts: HashMap<_, _> = match placed.await {
        Ok(rows) => rows.into_iter().collect(),
        Err(error) => {
            warn!(%error, "batch placement failed; placing one by one");
            return (Vec::new(), ready.into_iter().map(|r| r.op).collect());
        }
    };
    let mut placed = Vec::with_capacity(ready.len());
    let mut single = Vec::new();
    for mut r in ready {
        if r.capsule.host_id.is_none() {
            r.capsule.host_id = hosts.get(&r.capsule.id).copied().flatten();
        }
        if r.capsule.host_id.is_some() {
            placed.push(r);
        } else {
            single.push(r.op);
        }
    }
    (placed, single)
}

/// Creates the sandboxes on their agents, concurrently. Returns the creates to complete,
/// and the outcomes of those whose agent call failed.
async fn create_sandboxes(
    ctx: &JobContext,
    placed: Vec<Ready>,
    spans: &Spans,
) -> (Vec<(Ready, Host)>, Vec<(Operation, JobResult)>) {
    let mut agents: HashMap<HostId, Result<(Host, AgentClient), JobError>> = HashMap::new();
    for r in &placed {
        let host_id = r.capsule.host_id.expect("placed");
        if let std::collections::hash_map::Entry::Vacant(slot) = agents.entry(host_id) {
            slot.insert(agent_on(ctx, host_id).await);
        }
    }
    let calls = placed.into_iter().map(|r| {
        let agent = &agents[&r.capsule.host_id.expect("placed")];
        async move {
            let (host, client) = match agent {
                Ok(pair) => pair,
                Err(error) => return Err((r.op, error.clone())),
            };
            let request = sandbox_request(&r.capsule, &r.template);
            let mut client = client.clone();
            let call = client.create_sandbox(request);
            match call.instrument(span_of(spans, &r.op)).await {
                Ok(_) => Ok((r, host.clone())),
                Err(status) => Err((r.op, AgentError::from(status).into())),
            }
        }
    });
    let mut created = Vec::new();
    let mut failed = Vec::new();
    for outcome in join_all(calls).await {
        match outcome {
            Ok(pair) => created.push(pair),
            Err((op, error)) => failed.push((op, Err(error))),
        }
    }
    (created, failed)
}

/// Marks the created capsules running, their operations succeeded and records the events,
/// in one transaction; then publishes the events and wakes destroys that waited for these
/// creates. Returns the outcomes, and the operations whose completion did not apply.
async fn complete(
    ctx: &JobContext,
    created: Vec<(Ready, Host)>,
) -> (Vec<(Operation, JobResult)>, Vec<Operation>) {
    if created.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let batch: Vec<Completion> = created
        .iter()
        .map(|(r, host)| Completion {
            operation: r.op.id,
            capsule: r.capsule.id,
            from: CapsuleStatus::Starting,
            generation: r.capsule.generation,
            to: CapsuleStatus::Running,
            result: json!({ "host_id": host.id, "host": host.name }),
            message: "capsule running".into(),
        })
        .collect();
    let committed = async {
        let mut tx = ctx.pool.begin().await?;
        let events = completions::complete_many(&mut tx, &ctx.worker, &batch).await?;
        let finished: Vec<OperationId> = events.iter().filter_map(|e| e.operation_id).collect();
        operations::notify_finished(&mut tx, &finished).await?;
        tx.commit().await?;
        Ok::<_, JobError>(events)
    };
    let events = match committed.await {
        Ok(events) => events,
        Err(error) => {
            let message = error.to_string();
            let failed = created
                .into_iter()
                .map(|(r, _)| (r.op, Err(JobError::Transient(message.clone()))))
                .collect();
            return (failed, Vec::new());
        }
    };
    enqueue::publish_events(&ctx.queue, &events).await;
    let done: std::collections::HashSet<OperationId> =
        events.iter().filter_map(|e| e.operation_id).collect();
    wake_waiting_destroys(ctx, &events).await;
    let (applied, leftover): (Vec<_>, Vec<_>) = created
        .into_iter()
        .partition(|(r, _)| done.contains(&r.op.id));
    (
        applied.into_iter().map(|(r, _)| (r.op, Ok(()))).collect(),
        leftover.into_iter().map(|(r, _)| r.op).collect(),
    )
}

/// Destroys queued behind these creates may run now: push them at once.
async fn wake_waiting_destroys(ctx: &JobContext, events: &[hangar_jobs::store::Event]) {
    let capsules: Vec<uuid::Uuid> = events
        .iter()
        .filter_map(|e| e.capsule_id)
        .map(|c| c.0)
        .collect();
    let waiting = match ctx.pool.acquire().await {
        Ok(mut conn) => operations::destroys_in_flight(&mut conn, &capsules).await,
        Err(e) => Err(e.into()),
    };
    match waiting {
        Ok(ids) if !ids.is_empty() => {
            let jobs: Vec<_> = ids
                .into_iter()
                .map(|id| (OperationKind::Destroy, id))
                .collect();
            enqueue::push_committed(&ctx.pool, &ctx.queue, &jobs).await;
        }
        Ok(_) => {}
        Err(error) => {
            warn!(%error, "could not look for waiting destroys; the reconciler will push them")
        }
    }
}
