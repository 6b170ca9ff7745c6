//! `destroy`: runs after the capsule's in-flight operation, if any; destroys the sandbox
//! (destroying one that is gone succeeds), gives back the host reservation, and marks the
//! capsule stopped. Destroy supersedes: it acts on the capsule's current generation.

use hangar_jobs::CapsuleStatus;
use hangar_jobs::agents::AgentError;
use hangar_jobs::store::{Operation, capsules, operations};
use hangar_proto::SandboxRef;
use serde_json::json;

use super::{JobError, JobResult, agent_for, complete, load_capsule, supersede};
use crate::context::JobContext;

pub async fn run(ctx: &JobContext, op: &Operation) -> JobResult {
    let mut capsule = load_capsule(ctx, op).await?;
    if capsule.status == CapsuleStatus::Stopped {
        supersede(ctx, op, "capsule already stopped").await?;
        return Ok(());
    }
    if capsule.status != CapsuleStatus::Stopping {
        let mut conn = ctx.pool.acquire().await?;
        if operations::in_flight(&mut conn, capsule.id)
            .await?
            .is_some()
        {
            return Err(JobError::Deferred);
        }
        if !capsule.status.can_become(CapsuleStatus::Stopping) {
            // A transient status with no operation behind it: its deadline settles it
            // (to `error`), after which this destroy runs.
            return Err(JobError::Deferred);
        }
        capsule = capsules::transition(
            &mut conn,
            capsule.id,
            capsule.status,
            capsule.generation,
            CapsuleStatus::Stopping,
            None,
        )
        .await?
        .ok_or(JobError::Deferred)?;
    }
    let existed = match capsule.host_id {
        Some(_) => {
            let (_, mut agent) = agent_for(ctx, &capsule).await?;
            agent
                .destroy_sandbox(SandboxRef {
                    sandbox_id: capsule.id.to_string(),
                })
                .await
                .map_err(AgentError::from)?
                .into_inner()
                .existed
        }
        // Never placed (e.g. its create failed for lack of capacity): nothing to destroy.
        None => false,
    };
    complete(
        ctx,
        op,
        &capsule,
        CapsuleStatus::Stopped,
        json!({ "vm_existed": existed }),
        "capsule stopped",
    )
    .await
}
