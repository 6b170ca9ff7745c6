//! Operations (job handles): `GET /v1/operations/{id}` with an optional `?wait=` long poll
//! until the operation is terminal, and the filtered listing. Admin keys see every team's
//! operations (an admin destroy of a team's capsule is an operation of that team).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use hangar_jobs::store::Operation;
use hangar_jobs::store::operations::{self, OperationFilter};
use hangar_jobs::{CapsuleId, OperationId, OperationKind, OperationStatus, TeamId};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::domain::{self, PageLimit, WaitSec};
use crate::error::{ApiError, ErrorEnvelope};
use crate::extract::{Caller, PathId, QueryParams};

/// How often a parked request re-reads its row even without a notification (the
/// listener may have reconnected and missed one).
const SAFETY_NET: Duration = Duration::from_secs(5);

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(get_one))
}

// Query fields are text, parsed by the handler so that errors name the parameter; the
// document shows their real types.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct GetQuery {
    /// Seconds (0..=300) to wait for the operation to be terminal before answering.
    #[param(value_type = Option<u32>, maximum = 300)]
    wait: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    #[param(value_type = Option<CapsuleId>)]
    capsule_id: Option<String>,
    #[param(value_type = Option<OperationStatus>)]
    status: Option<String>,
    #[param(value_type = Option<OperationKind>)]
    kind: Option<String>,
    /// Page size, 1..=200 (default 50).
    #[param(value_type = Option<u32>)]
    limit: Option<String>,
    /// The previous page's `next_cursor`.
    #[param(value_type = Option<OperationId>)]
    cursor: Option<String>,
}

/// A page of operations, newest first.
#[derive(Serialize, ToSchema)]
struct OperationPage {
    operations: Vec<Operation>,
    /// Pass as `cursor` for the next page; null on the last one.
    next_cursor: Option<OperationId>,
}

fn scope(caller: &Caller) -> Option<TeamId> {
    (!caller.is_admin()).then_some(caller.0.team_id)
}

/// One operation; with `?wait=`, a long poll until it is terminal.
#[utoipa::path(
    get,
    path = "/v1/operations/{id}",
    tag = "operations",
    security(("api_key" = [])),
    params(("id" = OperationId, Path), GetQuery),
    responses(
        (status = 200, body = Operation),
        (status = 400, description = "Malformed id or `wait`", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
        (status = 404, description = "No such operation in this team", body = ErrorEnvelope),
    )
)]
async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    PathId(id): PathId<OperationId>,
    QueryParams(q): QueryParams<GetQuery>,
) -> Result<Json<Operation>, ApiError> {
    let wait = domain::int_param::<WaitSec>("wait", q.wait.as_deref(), 0)?;
    let team = scope(&caller);
    let wait = Duration::from_secs(wait.get().unsigned_abs().into());
    let op = if wait.is_zero() {
        load(&state, team, id).await?
    } else {
        wait_until_terminal(&state, team, id, wait).await?
    };
    Ok(Json(op))
}

async fn load(
    state: &AppState,
    team: Option<TeamId>,
    id: OperationId,
) -> Result<Operation, ApiError> {
    let mut conn = state.pool.acquire().await?;
    operations::get(&mut conn, team, id)
        .await?
        .ok_or(ApiError::NotFound("operation"))
}

/// Returns the operation once it is terminal, or as it is when `wait` has passed (or the
/// server is shutting down). Holds no database connection while parked.
async fn wait_until_terminal(
    state: &AppState,
    team: Option<TeamId>,
    id: OperationId,
    wait: Duration,
) -> Result<Operation, ApiError> {
    let deadline = Instant::now() + wait;
    // Subscribed before the first read: a finish committed after the read still wakes us.
    let subscription = state.waiters.subscribe(id);
    let mut closing = state.waiters.closing();
    loop {
        let notified = subscription.notify().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let op = load(state, team, id).await?;
        let now = Instant::now();
        if op.status.is_terminal() || now >= deadline || *closing.borrow() {
            return Ok(op);
        }
        let nap = (deadline - now).min(SAFETY_NET);
        tokio::select! {
            () = &mut notified => {}
            () = tokio::time::sleep(nap) => {}
            _ = closing.changed() => {}
        }
    }
}

/// The team's operations (every team's for admin keys), newest first.
#[utoipa::path(
    get,
    path = "/v1/operations",
    tag = "operations",
    security(("api_key" = [])),
    params(ListQuery),
    responses(
        (status = 200, body = OperationPage),
        (status = 400, description = "A malformed filter", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
    )
)]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(q): QueryParams<ListQuery>,
) -> Result<Json<OperationPage>, ApiError> {
    let filter = OperationFilter {
        team: scope(&caller),
        capsule: domain::param::<CapsuleId>("capsule_id", q.capsule_id.as_deref())?,
        status: domain::param::<OperationStatus>("status", q.status.as_deref())?,
        kind: domain::param::<OperationKind>("kind", q.kind.as_deref())?,
        before: domain::param::<OperationId>("cursor", q.cursor.as_deref())?,
        limit: domain::int_param::<PageLimit>("limit", q.limit.as_deref(), PageLimit::DEFAULT)?
            .get()
            .into(),
    };
    let mut conn = state.pool.acquire().await?;
    let page = operations::list(&mut conn, &filter).await?;
    let next_cursor = (page.len() as i64 == filter.limit)
        .then(|| page.last().map(|o| o.id))
        .flatten();
    Ok(Json(OperationPage {
        operations: page,
        next_cursor,
    }))
}
