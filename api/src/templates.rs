//! Templates a team may create capsules from: its own and the platform's.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use hangar_jobs::store::tenancy;
use serde_json::json;

use crate::AppState;
use crate::error::ApiError;
use crate::extract::Caller;

pub(crate) fn router() -> Router<AppState> {
    Router::new().route("/v1/templates", get(list))
}

async fn list(
    State(state): State<AppState>,
    Caller(caller): Caller,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    let templates = tenancy::list_templates(&mut conn, caller.team_id).await?;
    Ok(Json(json!({ "templates": templates })))
}
