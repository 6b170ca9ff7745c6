//! `snapshot`: snapshot the capsule's VM into a template, then return the capsule to where
//! it was or destroy it (the admin snapshot-then-destroy). The step reached is recorded in
//! the operation row, so a retry resumes after it:
//!
//! 1. `snapshotted`: a pending template row exists and the agent holds the snapshot;
//! 2. `promoted`: the template is ready, replacing (retiring) any older one of that name —
//!    only now, so the old template is never lost before the new one exists;
//! 3. `stopping` (destroy after): the capsule moved to `stopping`; then the VM is destroyed.

use hangar_jobs::agents::AgentError;
use hangar_jobs::store::tenancy::{self, NewSnapshotTemplate, PLATFORM_TEAM};
use hangar_jobs::store::{Capsule, Operation, capsules, operations};
use hangar_jobs::{CapsuleStatus, TemplateId};
use hangar_proto::{CreateSnapshotRequest, DeleteSnapshotRequest, SandboxRef};
use serde::Deserialize;
use serde_json::json;
use tracing::warn;

use super::{JobError, JobResult, agent_for, capsule_at, complete, load_capsule};
use crate::context::JobContext;

#[derive(Deserialize)]
struct Params {
    name: String,
    template_id: TemplateId,
    #[serde(default)]
    destroy_after: bool,
    prior_status: CapsuleStatus,
    #[serde(default)]
    platform: bool,
}

pub async fn run(ctx: &JobContext, op: &Operation) -> JobResult {
    let params: Params =
        serde_json::from_value(op.params.clone()).map_err(|e| JobError::Permanent {
            code: "invalid_operation",
            message: format!("snapshot parameters: {e}"),
        })?;
    let mut step = op.step.clone();
    if step.is_none() {
        let capsule = capsule_at(ctx, op, CapsuleStatus::Snapshotting).await?;
        take_snapshot(ctx, op, &capsule, &params).await?;
        step = Some("snapshotted".into());
    }
    if step.as_deref() == Some("snapshotted") {
        capsule_at(ctx, op, CapsuleStatus::Snapshotting).await?;
        promote(ctx, op, &params).await?;
        step = Some("promoted".into());
    }
    let result = json!({ "template_id": params.template_id, "template": params.name });
    if step.as_deref() == Some("promoted") {
        let capsule = capsule_at(ctx, op, CapsuleStatus::Snapshotting).await?;
        if !params.destroy_after {
            return complete(
                ctx,
                op,
                &capsule,
                params.prior_status,
                result,
                "snapshot taken",
            )
            .await;
        }
        begin_destroy(ctx, op, &capsule).await?;
    }
    // Step `stopping`: destroy the VM now that the template holds its state.
    let capsule = load_capsule(ctx, op).await?;
    if capsule.status != CapsuleStatus::Stopping {
        return Err(JobError::Stale(format!(
            "capsule is {}, expected stopping",
            capsule.status
        )));
    }
    let (_, mut agent) = agent_for(ctx, &capsule).await?;
    agent
        .destroy_sandbox(SandboxRef {
            sandbox_id: capsule.id.to_string(),
        })
        .await
        .map_err(AgentError::from)?;
    complete(
        ctx,
        op,
        &capsule,
        CapsuleStatus::Stopped,
        result,
        "snapshot taken; capsule stopped",
    )
    .await
}

async fn take_snapshot(
    ctx: &JobContext,
    op: &Operation,
    capsule: &Capsule,
    params: &Params,
) -> JobResult {
    let host = capsule.host_id.ok_or_else(|| JobError::Permanent {
        code: "not_placed",
        message: "capsule has no host".into(),
    })?;
    let mut conn = ctx.pool.acquire().await?;
    let pending = NewSnapshotTemplate {
        id: params.template_id,
        team_id: if params.platform {
            PLATFORM_TEAM
        } else {
            capsule.team_id
        },
        name: &params.name,
        host,
        source: capsule.id,
        vcpus: capsule.vcpus,
        memory_mb: capsule.memory_mb,
    };
    tenancy::insert_pending_template(&mut conn, pending).await?;
    drop(conn);
    let (_, mut agent) = agent_for(ctx, capsule).await?;
    let request = CreateSnapshotRequest {
        sandbox_id: capsule.id.to_string(),
        snapshot_id: params.template_id.to_string(),
        resume_after: params.prior_status == CapsuleStatus::Running && !params.destroy_after,
    };
    agent
        .create_snapshot(request)
        .await
        .map_err(AgentError::from)?;
    record_step(ctx, op, "snapshotted").await
}

/// Makes the new template the ready one of its name; deletes the retired one's snapshot.
async fn promote(ctx: &JobContext, op: &Operation, params: &Params) -> JobResult {
    let mut tx = ctx.pool.begin().await?;
    let retired = tenancy::promote_template(&mut tx, params.template_id).await?;
    if !operations::record_step(&mut tx, op.id, &ctx.worker, "promoted").await? {
        return Err(JobError::Stale("operation lease lost".into()));
    }
    tx.commit().await?;
    if let Some(old) = retired {
        delete_retired_snapshot(ctx, old.id, old.snapshot_host_id).await;
    }
    Ok(())
}

/// Best effort: a leftover snapshot costs disk, never correctness.
async fn delete_retired_snapshot(
    ctx: &JobContext,
    template: TemplateId,
    host: Option<hangar_jobs::HostId>,
) {
    let Some(host_id) = host else { return };
    let host = match ctx.pool.acquire().await {
        Ok(mut conn) => hangar_jobs::store::hosts::get(&mut conn, host_id)
            .await
            .ok()
            .flatten(),
        Err(_) => None,
    };
    let Some(host) = host else { return };
    let Ok(mut agent) = ctx.agents.client(&host) else {
        return;
    };
    if let Err(error) = agent
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: template.to_string(),
        })
        .await
    {
        warn!(%error, %template, "could not delete a retired template's snapshot");
    }
}

async fn begin_destroy(ctx: &JobContext, op: &Operation, capsule: &Capsule) -> JobResult {
    let mut tx = ctx.pool.begin().await?;
    capsules::transition(
        &mut tx,
        capsule.id,
        capsule.status,
        capsule.generation,
        CapsuleStatus::Stopping,
        None,
    )
    .await?
    .ok_or_else(|| JobError::Stale("capsule changed during the snapshot".into()))?;
    if !operations::record_step(&mut tx, op.id, &ctx.worker, "stopping").await? {
        return Err(JobError::Stale("operation lease lost".into()));
    }
    tx.commit().await?;
    Ok(())
}

async fn record_step(ctx: &JobContext, op: &Operation, step: &str) -> JobResult {
    let mut conn = ctx.pool.acquire().await?;
    if !operations::record_step(&mut conn, op.id, &ctx.worker, step).await? {
        return Err(JobError::Stale("operation lease lost".into()));
    }
    Ok(())
}
