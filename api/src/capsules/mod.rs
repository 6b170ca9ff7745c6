//! Capsules: the team routes (`/v1/capsules…`) here, and the admin routes
//! (`/v1/admin/capsules…`, in `admin.rs`), which share the functions below; admins see
//! every team.

use axum::Json;
use axum::extract::State;
use hangar_jobs::intents::{self, Accepted, CreateCapsule};
use hangar_jobs::store::capsules::{self, CapsuleFilter};
use hangar_jobs::store::{Capsule, Principal, Template, operations, tenancy};
use hangar_jobs::{CapsuleId, CapsuleStatus, HostId, OperationKind, TeamId, enqueue};
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::audit;
use crate::domain::{self, MemoryMb, PageLimit, TemplateName, TimeoutSec, Vcpus};
use crate::error::{ApiError, ErrorEnvelope};
use crate::extract::{Caller, Empty, IdempotencyKey, JsonBody, PathId, QueryParams};
use crate::idempotency::{AcceptedBody, Idempotency, Reply};

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(team_create, team_list))
        .routes(routes!(team_get, team_destroy))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(team_snapshot))
        .routes(routes!(keepalive))
        .routes(routes!(exec::exec))
}

mod admin;
mod exec;
mod requests;

pub(crate) use admin::router as admin_router;
pub(crate) use exec::MAX_TIMEOUT_SECS as MAX_EXEC_TIMEOUT_SECS;

use requests::{
    CapsulePage, CreateCapsuleBody, KeepaliveBody, KeepaliveReply, NewCapsule, SnapshotBody,
    TeamListQuery, snapshot_params,
};

// ---- team routes ----

/// Creates a capsule from a template.
#[utoipa::path(
    post,
    path = "/v1/capsules",
    tag = "capsules",
    security(("api_key" = [])),
    params(IdempotencyKey),
    request_body = CreateCapsuleBody,
    responses(
        (status = 202, description = "Accepted: poll the operation (`Location`)", body = AcceptedBody, headers(("Location" = String, description = "`/v1/operations/{id}`"))),
        (status = 400, description = "Invalid input", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
        (status = 422, description = "`Idempotency-Key` reused for another request", body = ErrorEnvelope),
    )
)]
async fn team_create(
    State(state): State<AppState>,
    Caller(actor): Caller,
    key: IdempotencyKey,
    body: JsonBody<CreateCapsuleBody>,
) -> Result<Reply, ApiError> {
    create(&state, &actor, key, body).await
}

/// The team's capsules, newest first.
#[utoipa::path(
    get,
    path = "/v1/capsules",
    tag = "capsules",
    security(("api_key" = [])),
    params(TeamListQuery),
    responses(
        (status = 200, body = CapsulePage),
        (status = 400, description = "Invalid input", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
    )
)]
async fn team_list(
    State(state): State<AppState>,
    Caller(actor): Caller,
    QueryParams(q): QueryParams<TeamListQuery>,
) -> Result<Json<CapsulePage>, ApiError> {
    let filter = filter(
        Some(actor.team_id),
        q.status.as_deref(),
        None,
        q.limit.as_deref(),
        q.cursor.as_deref(),
    )?;
    list(&state, filter).await
}

/// One capsule.
#[utoipa::path(
    get,
    path = "/v1/capsules/{id}",
    tag = "capsules",
    security(("api_key" = [])),
    params(("id" = CapsuleId, Path)),
    responses(
        (status = 200, body = Capsule),
        (status = 400, description = "Malformed id", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
        (status = 404, description = "No such capsule in this team", body = ErrorEnvelope),
    )
)]
async fn team_get(
    State(state): State<AppState>,
    Caller(actor): Caller,
    PathId(id): PathId<CapsuleId>,
) -> Result<Json<Capsule>, ApiError> {
    get_one(&state, Some(actor.team_id), id).await
}

/// Destroys a capsule; accepted in any state, it runs after the operation in flight.
#[utoipa::path(
    delete,
    path = "/v1/capsules/{id}",
    tag = "capsules",
    security(("api_key" = [])),
    params(("id" = CapsuleId, Path)),
    responses(
        (status = 202, description = "Accepted: poll the operation (`Location`)", body = AcceptedBody, headers(("Location" = String, description = "`/v1/operations/{id}`"))),
        (status = 400, description = "Malformed id", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
        (status = 404, description = "No such capsule in this team", body = ErrorEnvelope),
        (status = 409, description = "Not possible from the capsule's status, or the same operation is already in flight (`operation_in_progress`, with its id)", body = ErrorEnvelope),
    )
)]
async fn team_destroy(
    State(state): State<AppState>,
    Caller(actor): Caller,
    PathId(id): PathId<CapsuleId>,
) -> Result<Reply, ApiError> {
    Lifecycle::team(&actor, id, OperationKind::Destroy)
        .run(&state, no_params)
        .await
}

/// Pauses a running capsule.
#[utoipa::path(
    post,
    path = "/v1/capsules/{id}/pause",
    tag = "capsules",
    security(("api_key" = [])),
    params(("id" = CapsuleId, Path), IdempotencyKey),
    request_body(content = Empty, description = "None: send nothing, or `{}`"),
    responses(
        (status = 202, description = "Accepted: poll the operation (`Location`)", body = AcceptedBody, headers(("Location" = String, description = "`/v1/operations/{id}`"))),
        (status = 400, description = "Invalid input", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
        (status = 404, description = "No such capsule in this team", body = ErrorEnvelope),
        (status = 409, description = "Not possible from the capsule's status, or the same operation is already in flight (`operation_in_progress`, with its id)", body = ErrorEnvelope),
        (status = 422, description = "`Idempotency-Key` reused for another request", body = ErrorEnvelope),
    )
)]
async fn pause(
    State(state): State<AppState>,
    Caller(actor): Caller,
    PathId(id): PathId<CapsuleId>,
    key: IdempotencyKey,
    body: JsonBody<Empty>,
) -> Result<Reply, ApiError> {
    Lifecycle::team(&actor, id, OperationKind::Pause)
        .idempotent(key, body.hash)
        .run(&state, no_params)
        .await
}

/// Resumes a paused capsule.
#[utoipa::path(
    post,
    path = "/v1/capsules/{id}/resume",
    tag = "capsules",
    security(("api_key" = [])),
    params(("id" = CapsuleId, Path), IdempotencyKey),
    request_body(content = Empty, description = "None: send nothing, or `{}`"),
    responses(
        (status = 202, description = "Accepted: poll the operation (`Location`)", body = AcceptedBody, headers(("Location" = String, description = "`/v1/operations/{id}`"))),
        (status = 400, description = "Invalid input", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
        (status = 404, description = "No such capsule in this team", body = ErrorEnvelope),
        (status = 409, description = "Not possible from the capsule's status, or the same operation is already in flight (`operation_in_progress`, with its id)", body = ErrorEnvelope),
        (status = 422, description = "`Idempotency-Key` reused for another request", body = ErrorEnvelope),
    )
)]
async fn resume(
    State(state): State<AppState>,
    Caller(actor): Caller,
    PathId(id): PathId<CapsuleId>,
    key: IdempotencyKey,
    body: JsonBody<Empty>,
) -> Result<Reply, ApiError> {
    Lifecycle::team(&actor, id, OperationKind::Resume)
        .idempotent(key, body.hash)
        .run(&state, no_params)
        .await
}

/// Snapshots a capsule into a team template, then keeps or destroys it.
#[utoipa::path(
    post,
    path = "/v1/capsules/{id}/snapshot",
    tag = "capsules",
    security(("api_key" = [])),
    params(("id" = CapsuleId, Path), IdempotencyKey),
    request_body = SnapshotBody,
    responses(
        (status = 202, description = "Accepted: poll the operation (`Location`)", body = AcceptedBody, headers(("Location" = String, description = "`/v1/operations/{id}`"))),
        (status = 400, description = "Invalid input", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
        (status = 404, description = "No such capsule in this team", body = ErrorEnvelope),
        (status = 409, description = "Not possible from the capsule's status, or the same operation is already in flight (`operation_in_progress`, with its id)", body = ErrorEnvelope),
        (status = 422, description = "`Idempotency-Key` reused for another request", body = ErrorEnvelope),
    )
)]
async fn team_snapshot(
    State(state): State<AppState>,
    Caller(actor): Caller,
    PathId(id): PathId<CapsuleId>,
    key: IdempotencyKey,
    body: JsonBody<SnapshotBody>,
) -> Result<Reply, ApiError> {
    let name = TemplateName::try_from(body.value.name)?;
    let destroy_after = !body.value.keep;
    Lifecycle::team(&actor, id, OperationKind::Snapshot)
        .idempotent(key, body.hash)
        .run(&state, |c| snapshot_params(&name, c, destroy_after, false))
        .await
}

/// Pushes back the moment a capsule is auto-paused.
#[utoipa::path(
    post,
    path = "/v1/capsules/{id}/keepalive",
    tag = "capsules",
    security(("api_key" = [])),
    params(("id" = CapsuleId, Path), IdempotencyKey),
    request_body = KeepaliveBody,
    responses(
        (status = 200, body = KeepaliveReply),
        (status = 400, description = "Invalid input", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
        (status = 404, description = "No such capsule in this team", body = ErrorEnvelope),
        (status = 409, description = "The capsule is stopped", body = ErrorEnvelope),
        (status = 422, description = "`Idempotency-Key` reused for another request", body = ErrorEnvelope),
    )
)]
async fn keepalive(
    State(state): State<AppState>,
    Caller(actor): Caller,
    PathId(id): PathId<CapsuleId>,
    key: IdempotencyKey,
    body: JsonBody<KeepaliveBody>,
) -> Result<Reply, ApiError> {
    let timeout = body
        .value
        .timeout_sec
        .map(TimeoutSec::try_from)
        .transpose()?;
    let idem = Idempotency::new(actor.team_id, key, body.hash);
    let mut tx = state.pool.begin().await?;
    if let Some(reply) = idem.replay(&mut tx).await? {
        return Ok(reply);
    }
    let capsule = capsules::get(&mut tx, Some(actor.team_id), id)
        .await?
        .ok_or(ApiError::NotFound("capsule"))?;
    let timeout_sec = timeout.map_or(capsule.timeout_sec, TimeoutSec::get);
    let expires_at = capsules::keepalive(&mut tx, actor.team_id, id, timeout_sec)
        .await?
        .ok_or_else(|| ApiError::InvalidState("capsule is stopped".into()))?;
    let reply = Reply::ok(json!(KeepaliveReply { expires_at }));
    idem.remember(&mut tx, &reply).await?;
    tx.commit().await?;
    Ok(reply)
}

// ---- shared ----

/// Creates a capsule in the caller's team (admin keys: the platform team).
#[tracing::instrument(skip_all, fields(team_id = %actor.team_id))]
async fn create(
    state: &AppState,
    actor: &Principal,
    key: IdempotencyKey,
    body: JsonBody<CreateCapsuleBody>,
) -> Result<Reply, ApiError> {
    let new = NewCapsule::try_from(body.value)?;
    let idem = Idempotency::new(actor.team_id, key, body.hash);
    let mut tx = state.pool.begin().await?;
    if let Some(reply) = idem.replay(&mut tx).await? {
        return Ok(reply);
    }
    let template = template_for(state, &mut tx, actor.team_id, new.template.as_str()).await?;
    let accepted = intents::create_capsule(
        &mut tx,
        CreateCapsule {
            team_id: actor.team_id,
            vcpus: new.vcpus.map_or(template.vcpus, Vcpus::get),
            memory_mb: new.memory_mb.map_or(template.memory_mb, MemoryMb::get),
            timeout_sec: new.timeout_sec.get(),
            metadata: new.metadata.to_json(),
            template,
            max_attempts: state.config.max_attempts,
        },
    )
    .await?;
    audit_accepted(&mut tx, actor, "capsule.create", &accepted).await?;
    let reply = Reply::accepted(&accepted);
    idem.remember(&mut tx, &reply).await?;
    tx.commit().await?;
    push(state, &accepted).await;
    Ok(reply)
}

/// Pause, resume, snapshot or destroy of one capsule.
struct Lifecycle<'a> {
    actor: &'a Principal,
    /// The team whose capsules the caller may touch; `None` for admins (any team).
    scope: Option<TeamId>,
    id: CapsuleId,
    kind: OperationKind,
    idempotency: Option<Idempotency>,
}

fn no_params(_: &Capsule) -> serde_json::Value {
    json!({})
}

impl<'a> Lifecycle<'a> {
    fn team(actor: &'a Principal, id: CapsuleId, kind: OperationKind) -> Self {
        let scope = Some(actor.team_id);
        Self {
            actor,
            scope,
            id,
            kind,
            idempotency: None,
        }
    }

    fn admin(actor: &'a Principal, id: CapsuleId, kind: OperationKind) -> Self {
        Self {
            actor,
            scope: None,
            id,
            kind,
            idempotency: None,
        }
    }

    fn idempotent(mut self, key: IdempotencyKey, request_hash: Vec<u8>) -> Self {
        self.idempotency = Some(Idempotency::new(self.actor.team_id, key, request_hash));
        self
    }

    /// One transaction: replay check, the capsule, the intent, the audit row and the
    /// stored reply; then, after commit, the push.
    #[tracing::instrument(skip_all, fields(capsule_id = %self.id, kind = %self.kind))]
    async fn run(
        self,
        state: &AppState,
        params: impl FnOnce(&Capsule) -> serde_json::Value,
    ) -> Result<Reply, ApiError> {
        let Self {
            actor,
            scope,
            id,
            kind,
            idempotency,
        } = self;
        let mut tx = state.pool.begin().await?;
        if let Some(idem) = &idempotency
            && let Some(reply) = idem.replay(&mut tx).await?
        {
            return Ok(reply);
        }
        let capsule = capsules::get(&mut tx, scope, id)
            .await?
            .ok_or(ApiError::NotFound("capsule"))?;
        // Asking again for what is already under way: answer with its handle. (Any other
        // request is checked against the capsule's status first, then the in-flight slot.)
        if kind != OperationKind::Destroy
            && let Some(op) = operations::in_flight(&mut tx, id).await?
            && op.kind == kind
        {
            return Err(ApiError::OperationInProgress { operation: op.id });
        }
        let params = params(&capsule);
        let accepted =
            intents::capsule_operation(&mut tx, capsule, kind, params, state.config.max_attempts)
                .await?;
        audit_accepted(&mut tx, actor, &format!("capsule.{kind}"), &accepted).await?;
        let reply = Reply::accepted(&accepted);
        if let Some(idem) = &idempotency {
            idem.remember(&mut tx, &reply).await?;
        }
        tx.commit().await?;
        if accepted.is_new {
            push(state, &accepted).await;
        }
        Ok(reply)
    }
}

async fn audit_accepted(
    conn: &mut hangar_jobs::store::PgConnection,
    actor: &Principal,
    action: &str,
    accepted: &Accepted,
) -> Result<(), ApiError> {
    audit::accepted(
        conn,
        Some(actor),
        Some(accepted.capsule.team_id),
        action,
        accepted.capsule.id,
        json!({ "operation_id": accepted.operation.id }),
    )
    .await
}

/// After commit: a failed push still answers 202 (the reconciler pushes it later).
async fn push(state: &AppState, accepted: &Accepted) {
    let job = [(accepted.operation.kind, accepted.operation.id)];
    enqueue::push_committed(&state.pool, &state.queue, &job).await;
}

fn filter(
    team: Option<TeamId>,
    status: Option<&str>,
    host: Option<HostId>,
    limit: Option<&str>,
    cursor: Option<&str>,
) -> Result<CapsuleFilter, ApiError> {
    Ok(CapsuleFilter {
        team,
        status: domain::param::<CapsuleStatus>("status", status)?,
        host,
        before: domain::param::<CapsuleId>("cursor", cursor)?,
        limit: domain::int_param::<PageLimit>("limit", limit, PageLimit::DEFAULT)?
            .get()
            .into(),
    })
}

async fn list(state: &AppState, filter: CapsuleFilter) -> Result<Json<CapsulePage>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    let page = capsules::list(&mut conn, &filter).await?;
    let next_cursor = (page.len() as i64 == filter.limit)
        .then(|| page.last().map(|c| c.id))
        .flatten();
    Ok(Json(CapsulePage {
        capsules: page,
        next_cursor,
    }))
}

async fn get_one(
    state: &AppState,
    scope: Option<TeamId>,
    id: CapsuleId,
) -> Result<Json<Capsule>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    let capsule = capsules::get(&mut conn, scope, id)
        .await?
        .ok_or(ApiError::NotFound("capsule"))?;
    Ok(Json(capsule))
}

/// The template a team creates from by name. Base-image templates are cached briefly (their
/// content never changes); snapshot templates are always read, since a newer snapshot may
/// have replaced one.
async fn template_for(
    state: &AppState,
    conn: &mut sqlx::PgConnection,
    team: TeamId,
    name: &str,
) -> Result<Template, ApiError> {
    let key = (team, name.to_owned());
    if let Some(template) = state.image_templates.get(&key) {
        return Ok(template);
    }
    let template = tenancy::template_for_team(conn, team, name)
        .await?
        .ok_or_else(|| ApiError::UnknownTemplate(name.to_owned()))?;
    if template.image.is_some() {
        state.image_templates.insert(key, template.clone());
    }
    Ok(template)
}
