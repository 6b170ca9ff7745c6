//! Operator actions on operations (admin keys): retry a failed one, cancel a queued one.
//! Each is audited and, like every request, changes nothing when refused.

use axum::extract::State;
use hangar_jobs::intents::{self, Accepted};
use hangar_jobs::store::{Capsule, Operation, PgConnection, capsules, operations};
use hangar_jobs::{CapsuleId, OperationId, OperationKind, OperationStatus, TemplateId, enqueue};
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::audit;
use crate::error::{ApiError, ErrorEnvelope};
use crate::extract::{Admin, Empty, IdempotencyKey, JsonBody, PathId};
use crate::idempotency::{AcceptedBody, Idempotency, Reply};

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(retry))
        .routes(routes!(cancel))
}

/// A cancelled operation and its capsule as the cancel left it.
#[derive(Serialize, ToSchema)]
struct Cancelled {
    operation: Operation,
    capsule: Option<Capsule>,
}

/// `POST /v1/admin/operations/{id}/retry`: answers 202 with a NEW operation of the same kind
/// and parameters, accepted through the path the original request took. 409
/// `invalid_state` unless the operation is `failed`. What may be retried:
///
/// - `create`: only while its capsule is still in `error` as that failure left it (nothing
///   moved it since); the capsule goes back to `starting` on the host it was placed on.
/// - `pause`, `resume`, `snapshot`, `destroy`: when the capsule's status accepts that
///   request now, exactly as a new request would be (a capsule left in `error` by a failed
///   pause is in an unknown real state and can only be destroyed). A snapshot gets a fresh
///   template id and records the capsule's current status.
/// - `host_event`: never (a host report is applied once, or superseded).
#[utoipa::path(
    post,
    path = "/v1/admin/operations/{id}/retry",
    tag = "admin",
    security(("admin_key" = [])),
    params(("id" = OperationId, Path), IdempotencyKey),
    request_body(content = Empty, description = "None: send nothing, or `{}`"),
    responses(
        (status = 202, description = "Accepted: the new operation (`Location`)", body = AcceptedBody, headers(("Location" = String, description = "`/v1/operations/{id}`"))),
        (status = 400, description = "Invalid input", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
        (status = 403, description = "Not an admin key", body = ErrorEnvelope),
        (status = 404, description = "No such operation", body = ErrorEnvelope),
        (status = 409, description = "Not possible from the operation's or the capsule's state", body = ErrorEnvelope),
        (status = 422, description = "`Idempotency-Key` reused for another request", body = ErrorEnvelope),
    )
)]
pub(crate) async fn retry(
    State(state): State<AppState>,
    Admin(actor): Admin,
    PathId(id): PathId<OperationId>,
    key: IdempotencyKey,
    body: JsonBody<Empty>,
) -> Result<Reply, ApiError> {
    let idem = Idempotency::new(actor.team_id, key, body.hash);
    let mut tx = state.pool.begin().await?;
    if let Some(reply) = idem.replay(&mut tx).await? {
        return Ok(reply);
    }
    let failed = operations::get(&mut tx, None, id)
        .await?
        .ok_or(ApiError::NotFound("operation"))?;
    if failed.status != OperationStatus::Failed {
        return Err(ApiError::InvalidState(format!(
            "operation is {}; only failed operations can be retried",
            failed.status
        )));
    }
    let capsule = capsule_of(&mut tx, &failed).await?;
    let max_attempts = state.config.max_attempts;
    let accepted = match failed.kind {
        OperationKind::Create => {
            intents::retry_create(&mut tx, capsule, &failed, max_attempts).await?
        }
        OperationKind::HostEvent => {
            return Err(ApiError::InvalidState(
                "host reports are not retried".into(),
            ));
        }
        kind => {
            let params = retried_params(&failed, &capsule);
            intents::capsule_operation(&mut tx, capsule, kind, params, max_attempts).await?
        }
    };
    audit::accepted(
        &mut tx,
        Some(&actor),
        Some(accepted.capsule.team_id),
        "operation.retry",
        failed.id,
        json!({ "operation_id": accepted.operation.id, "capsule_id": accepted.capsule.id }),
    )
    .await?;
    let reply = Reply::accepted(&accepted);
    idem.remember(&mut tx, &reply).await?;
    tx.commit().await?;
    if accepted.is_new {
        push(&state, &accepted).await;
    }
    Ok(reply)
}

/// `POST /v1/admin/operations/{id}/cancel`: cancels an operation no worker has claimed
/// (`queued`): it ends `cancelled` with `error_code: cancelled_by_operator`, and its capsule
/// goes back from the transient status the operation put it in (a queued pause: `pausing`
/// back to `running`; a queued create: `error`, to be destroyed). 409 `invalid_state` when
/// it is not queued (a started job cannot be stopped safely), or is a destroy or a host
/// report. A worker that receives the job later finds it terminal and drops it.
#[utoipa::path(
    post,
    path = "/v1/admin/operations/{id}/cancel",
    tag = "admin",
    security(("admin_key" = [])),
    params(("id" = OperationId, Path), IdempotencyKey),
    request_body(content = Empty, description = "None: send nothing, or `{}`"),
    responses(
        (status = 200, description = "Cancelled", body = Cancelled),
        (status = 400, description = "Invalid input", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
        (status = 403, description = "Not an admin key", body = ErrorEnvelope),
        (status = 404, description = "No such operation", body = ErrorEnvelope),
        (status = 409, description = "Not possible from the operation's or the capsule's state", body = ErrorEnvelope),
        (status = 422, description = "`Idempotency-Key` reused for another request", body = ErrorEnvelope),
    )
)]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    Admin(actor): Admin,
    PathId(id): PathId<OperationId>,
    key: IdempotencyKey,
    body: JsonBody<Empty>,
) -> Result<Reply, ApiError> {
    let idem = Idempotency::new(actor.team_id, key, body.hash);
    let mut tx = state.pool.begin().await?;
    if let Some(reply) = idem.replay(&mut tx).await? {
        return Ok(reply);
    }
    let op = operations::get(&mut tx, None, id)
        .await?
        .ok_or(ApiError::NotFound("operation"))?;
    if op.status != OperationStatus::Queued {
        return Err(ApiError::InvalidState(format!(
            "operation is {}; only queued operations can be cancelled (a started job cannot \
             be stopped safely)",
            op.status
        )));
    }
    let cancelled = intents::cancel_queued(&mut tx, &op).await?;
    audit::accepted(
        &mut tx,
        Some(&actor),
        Some(op.team_id),
        "operation.cancel",
        op.id,
        json!({ "capsule_id": op.capsule_id }),
    )
    .await?;
    let reply = Reply::ok(
        serde_json::to_value(Cancelled {
            operation: cancelled.operation,
            capsule: cancelled.capsule,
        })
        .map_err(|e| ApiError::Internal(e.into()))?,
    );
    idem.remember(&mut tx, &reply).await?;
    tx.commit().await?;
    if let Some(capsule) = op.capsule_id {
        wake_waiting_destroy(&state, capsule).await;
    }
    Ok(reply)
}

async fn capsule_of(conn: &mut PgConnection, op: &Operation) -> Result<Capsule, ApiError> {
    let id = op
        .capsule_id
        .ok_or_else(|| ApiError::InvalidState("operation has no capsule".into()))?;
    capsules::get(conn, None, id)
        .await?
        .ok_or(ApiError::NotFound("capsule"))
}

/// The failed operation's parameters; a snapshot's are refreshed as a new request's would be
/// (its template id may already name the failed attempt's template).
fn retried_params(failed: &Operation, capsule: &Capsule) -> serde_json::Value {
    let mut params = failed.params.clone();
    if failed.kind == OperationKind::Snapshot {
        params["template_id"] = json!(TemplateId::new());
        params["prior_status"] = json!(capsule.status);
    }
    params
}

/// After commit: a failed push still answers 202 (the reconciler pushes it later).
async fn push(state: &AppState, accepted: &Accepted) {
    let job = [(accepted.operation.kind, accepted.operation.id)];
    enqueue::push_committed(&state.pool, &state.queue, &job).await;
}

/// A destroy waiting behind the cancelled operation may run now.
async fn wake_waiting_destroy(state: &AppState, capsule: CapsuleId) {
    let waiting = match state.pool.acquire().await {
        Ok(mut conn) => operations::destroy_in_flight(&mut conn, capsule).await,
        Err(e) => Err(e.into()),
    };
    match waiting {
        Ok(Some(destroy)) => {
            let job = [(OperationKind::Destroy, destroy)];
            enqueue::push_committed(&state.pool, &state.queue, &job).await;
        }
        Ok(None) => {}
        Err(error) => {
            tracing::warn!(%error, "could not look for a waiting destroy; the reconciler will push it")
        }
    }
}
