//! `pause` and `resume`: one agent call each.

use hangar_jobs::CapsuleStatus;
use hangar_jobs::agents::AgentError;
use hangar_jobs::store::{Operation, capsules};
use hangar_proto::SandboxRef;
use serde_json::json;

use super::{JobResult, agent_for, capsule_at, complete};
use crate::context::JobContext;

pub async fn pause(ctx: &JobContext, op: &Operation) -> JobResult {
    let capsule = capsule_at(ctx, op, CapsuleStatus::Pausing).await?;
    let (_, mut agent) = agent_for(ctx, &capsule).await?;
    agent
        .pause_sandbox(SandboxRef {
            sandbox_id: capsule.id.to_string(),
        })
        .await
        .map_err(AgentError::from)?;
    complete(
        ctx,
        op,
        &capsule,
        CapsuleStatus::Paused,
        json!({}),
        "capsule paused",
    )
    .await
}

pub async fn resume(ctx: &JobContext, op: &Operation) -> JobResult {
    let capsule = capsule_at(ctx, op, CapsuleStatus::Resuming).await?;
    let (_, mut agent) = agent_for(ctx, &capsule).await?;
    agent
        .resume_sandbox(SandboxRef {
            sandbox_id: capsule.id.to_string(),
        })
        .await
        .map_err(AgentError::from)?;
    // A resumed capsule gets a full timeout again, or it would be auto-paused at once.
    let mut conn = ctx.pool.acquire().await?;
    capsules::keepalive(&mut conn, capsule.team_id, capsule.id, capsule.timeout_sec).await?;
    drop(conn);
    complete(
        ctx,
        op,
        &capsule,
        CapsuleStatus::Running,
        json!({}),
        "capsule running",
    )
    .await
}
