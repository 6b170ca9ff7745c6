//! `create`: place the capsule on a host (reserving room atomically), create its sandbox
//! on that host's agent, and mark it running.

use hangar_jobs::store::{self, Capsule, Operation, Template, tenancy};
use hangar_jobs::{CapsuleStatus, HostId};
use hangar_proto::CreateSandboxRequest;
use serde_json::json;

use super::{JobError, JobResult, agent_for, capsule_at, complete};
use crate::context::JobContext;

pub(super) async fn run(ctx: &JobContext, op: &Operation) -> JobResult {
    let capsule = capsule_at(ctx, op, CapsuleStatus::Starting).await?;
    let template = {
        let mut conn = ctx.pool.acquire().await?;
        tenancy::get_template(&mut conn, capsule.template_id)
            .await?
            .ok_or_else(|| JobError::Permanent {
                code: "unknown_template",
                message: "template no longer exists".into(),
            })?
    };
    let capsule = place(ctx, capsule, template.snapshot_host_id).await?;
    let (host, mut agent) = agent_for(ctx, &capsule).await?;
    let request = sandbox_request(&capsule, &template);
    agent
        .create_sandbox(request)
        .await
        .map_err(hangar_jobs::agents::AgentError::from)?;
    let result = json!({ "host_id": host.id, "host": host.name });
    complete(
        ctx,
        op,
        &capsule,
        CapsuleStatus::Running,
        result,
        "capsule running",
    )
    .await
}

/// The agent request that creates `capsule`'s sandbox from `template`.
pub(super) fn sandbox_request(capsule: &Capsule, template: &Template) -> CreateSandboxRequest {
    CreateSandboxRequest {
        sandbox_id: capsule.id.to_string(),
        vcpus: capsule.vcpus as u32,
        memory_mb: capsule.memory_mb as u32,
        image: template.image.clone().unwrap_or_default(),
        snapshot_id: if template.snapshot_host_id.is_some() {
            template.id.to_string()
        } else {
            String::new()
        },
        generation: capsule.generation as u64,
    }
}

/// Reserves room on a host and records it on the capsule, once: a retried create reuses
/// the host a previous attempt reserved.
async fn place(
    ctx: &JobContext,
    capsule: Capsule,
    only: Option<HostId>,
) -> Result<Capsule, JobError> {
    if capsule.host_id.is_some() {
        return Ok(capsule);
    }
    let mut conn = ctx.pool.acquire().await?;
    let placed = store::hosts::place(
        &mut conn,
        capsule.id,
        capsule.vcpus,
        capsule.memory_mb,
        only,
    )
    .await?;
    // `None` may also mean another attempt placed it meanwhile: then use that host.
    let host = match placed {
        Some(host) => Some(host),
        None => store::capsules::get(&mut conn, None, capsule.id)
            .await?
            .and_then(|c| c.host_id),
    };
    match host {
        Some(host) => Ok(Capsule {
            host_id: Some(host),
            ..capsule
        }),
        None => Err(JobError::Permanent {
            code: "capacity_unavailable",
            message: format!(
                "no healthy host has room for {} vCPUs and {} MiB",
                capsule.vcpus, capsule.memory_mb
            ),
        }),
    }
}
