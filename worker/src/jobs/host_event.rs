//! `host_event`: a host's report about one of its VMs, applied as a conditional transition.

use hangar_jobs::CapsuleStatus;
use hangar_jobs::store::Operation;
use serde_json::json;

use super::{JobError, JobResult, complete, load_capsule, supersede};
use crate::context::JobContext;

pub async fn run(ctx: &JobContext, op: &Operation) -> JobResult {
    let capsule = load_capsule(ctx, op).await?;
    let kind = op.params["kind"].as_str().unwrap_or_default();
    let message = op.params["message"].as_str().unwrap_or_default();
    let to = match kind {
        "crashed" | "exited" => CapsuleStatus::Error,
        "auto_paused" => CapsuleStatus::Paused,
        other => {
            return Err(JobError::Permanent {
                code: "invalid_event",
                message: format!("unknown host event kind `{other}`"),
            });
        }
    };
    if capsule.status == to || !capsule.status.can_become(to) {
        // Already there, or the capsule moved on (e.g. it is being destroyed): nothing to do.
        supersede(
            ctx,
            op,
            &format!("capsule is {}; `{kind}` not applied", capsule.status),
        )
        .await?;
        return Ok(());
    }
    let reason = format!("host reported the VM {kind}: {message}");
    complete(ctx, op, &capsule, to, json!({ "applied": kind }), &reason).await
}
