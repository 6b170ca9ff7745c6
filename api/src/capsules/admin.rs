//! The admin capsule routes (`/v1/admin/capsules…`): any team's capsules, with admin keys.

use axum::Json;
use axum::extract::State;
use hangar_jobs::store::Capsule;
use hangar_jobs::{CapsuleId, HostId, OperationKind, TeamId};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::requests::{
    AdminListQuery, AdminSnapshotBody, CapsulePage, CreateCapsuleBody, snapshot_params,
};
use super::{Lifecycle, create, filter, get_one, list, no_params};
use crate::AppState;
use crate::domain::{self, TemplateName};
use crate::error::{ApiError, ErrorEnvelope};
use crate::extract::{Admin, IdempotencyKey, JsonBody, PathId, QueryParams};
use crate::idempotency::{AcceptedBody, Reply};

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(admin_create, admin_list))
        .routes(routes!(admin_get, admin_destroy))
        .routes(routes!(admin_snapshot))
}

/// Creates a capsule in the platform team.
#[utoipa::path(
    post,
    path = "/v1/admin/capsules",
    tag = "admin",
    security(("admin_key" = [])),
    params(IdempotencyKey),
    request_body = CreateCapsuleBody,
    responses(
        (status = 202, description = "Accepted: poll the operation (`Location`)", body = AcceptedBody, headers(("Location" = String, description = "`/v1/operations/{id}`"))),
        (status = 400, description = "Invalid input", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
        (status = 403, description = "Not an admin key", body = ErrorEnvelope),
        (status = 422, description = "`Idempotency-Key` reused for another request", body = ErrorEnvelope),
    )
)]
async fn admin_create(
    State(state): State<AppState>,
    Admin(actor): Admin,
    key: IdempotencyKey,
    body: JsonBody<CreateCapsuleBody>,
) -> Result<Reply, ApiError> {
    create(&state, &actor, key, body).await
}

/// Every team's capsules, newest first.
#[utoipa::path(
    get,
    path = "/v1/admin/capsules",
    tag = "admin",
    security(("admin_key" = [])),
    params(AdminListQuery),
    responses(
        (status = 200, body = CapsulePage),
        (status = 400, description = "Invalid input", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
        (status = 403, description = "Not an admin key", body = ErrorEnvelope),
    )
)]
async fn admin_list(
    State(state): State<AppState>,
    Admin(_): Admin,
    QueryParams(q): QueryParams<AdminListQuery>,
) -> Result<Json<CapsulePage>, ApiError> {
    let team = domain::param::<TeamId>("team_id", q.team_id.as_deref())?;
    let host = domain::param::<HostId>("host_id", q.host_id.as_deref())?;
    let filter = filter(
        team,
        q.status.as_deref(),
        host,
        q.limit.as_deref(),
        q.cursor.as_deref(),
    )?;
    list(&state, filter).await
}

/// Any team's capsule.
#[utoipa::path(
    get,
    path = "/v1/admin/capsules/{id}",
    tag = "admin",
    security(("admin_key" = [])),
    params(("id" = CapsuleId, Path)),
    responses(
        (status = 200, body = Capsule),
        (status = 400, description = "Malformed id", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
        (status = 403, description = "Not an admin key", body = ErrorEnvelope),
        (status = 404, description = "No such capsule", body = ErrorEnvelope),
    )
)]
async fn admin_get(
    State(state): State<AppState>,
    Admin(_): Admin,
    PathId(id): PathId<CapsuleId>,
) -> Result<Json<Capsule>, ApiError> {
    get_one(&state, None, id).await
}

/// Destroys any team's capsule.
#[utoipa::path(
    delete,
    path = "/v1/admin/capsules/{id}",
    tag = "admin",
    security(("admin_key" = [])),
    params(("id" = CapsuleId, Path)),
    responses(
        (status = 202, description = "Accepted: poll the operation (`Location`)", body = AcceptedBody, headers(("Location" = String, description = "`/v1/operations/{id}`"))),
        (status = 400, description = "Malformed id", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
        (status = 403, description = "Not an admin key", body = ErrorEnvelope),
        (status = 404, description = "No such capsule", body = ErrorEnvelope),
        (status = 409, description = "Not possible from the capsule's status, or the same operation is already in flight (`operation_in_progress`, with its id)", body = ErrorEnvelope),
    )
)]
async fn admin_destroy(
    State(state): State<AppState>,
    Admin(actor): Admin,
    PathId(id): PathId<CapsuleId>,
) -> Result<Reply, ApiError> {
    Lifecycle::admin(&actor, id, OperationKind::Destroy)
        .run(&state, no_params)
        .await
}

/// Snapshots any team's capsule as a platform template, then destroys it.
#[utoipa::path(
    post,
    path = "/v1/admin/capsules/{id}/snapshot",
    tag = "admin",
    security(("admin_key" = [])),
    params(("id" = CapsuleId, Path), IdempotencyKey),
    request_body = AdminSnapshotBody,
    responses(
        (status = 202, description = "Accepted: poll the operation (`Location`)", body = AcceptedBody, headers(("Location" = String, description = "`/v1/operations/{id}`"))),
        (status = 400, description = "Invalid input", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
        (status = 403, description = "Not an admin key", body = ErrorEnvelope),
        (status = 404, description = "No such capsule", body = ErrorEnvelope),
        (status = 409, description = "Not possible from the capsule's status, or the same operation is already in flight (`operation_in_progress`, with its id)", body = ErrorEnvelope),
        (status = 422, description = "`Idempotency-Key` reused for another request", body = ErrorEnvelope),
    )
)]
async fn admin_snapshot(
    State(state): State<AppState>,
    Admin(actor): Admin,
    PathId(id): PathId<CapsuleId>,
    key: IdempotencyKey,
    body: JsonBody<AdminSnapshotBody>,
) -> Result<Reply, ApiError> {
    let name = TemplateName::try_from(body.value.name)?;
    Lifecycle::admin(&actor, id, OperationKind::Snapshot)
        .idempotent(key, body.hash)
        .run(&state, |c| snapshot_params(&name, c, true, true))
        .await
}
