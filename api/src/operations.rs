//! Operations (job handles): `GET /v1/operations/{id}` with an optional `?wait=` long poll
//! until the operation is terminal, and the filtered listing. Admin keys see every team's
//! operations (an admin destroy of a team's capsule is an operation of that team).

use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use hangar_jobs::store::Operation;
use hangar_jobs::store::operations::{self, OperationFilter};
use hangar_jobs::{CapsuleId, OperationId, OperationKind, OperationStatus, TeamId};
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;

use crate::AppState;
use crate::domain::{self, PageLimit, WaitSec};
use crate::error::ApiError;
use crate::extract::{Caller, PathId, QueryParams};

/// How often a parked request re-reads its row even without a notification (the
/// listener may have reconnected and missed one).
const SAFETY_NET: Duration = Duration::from_secs(5);

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/operations", get(list))
        .route("/v1/operations/{id}", get(get_one))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GetQuery {
    wait: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    capsule_id: Option<String>,
    status: Option<String>,
    kind: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

fn scope(caller: &Caller) -> Option<TeamId> {
    (!caller.is_admin()).then_some(caller.0.team_id)
}

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

async fn list(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(q): QueryParams<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
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
    Ok(Json(
        json!({ "operations": page, "next_cursor": next_cursor }),
    ))
}
