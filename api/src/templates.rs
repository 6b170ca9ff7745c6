//! Templates a team may create capsules from: its own and the platform's.

use axum::Json;
use axum::extract::State;
use hangar_jobs::store::{Template, tenancy};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::error::{ApiError, ErrorEnvelope};
use crate::extract::Caller;

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list))
}

#[derive(Serialize, ToSchema)]
struct TemplateList {
    templates: Vec<Template>,
}

/// The team's templates and the platform's.
#[utoipa::path(
    get,
    path = "/v1/templates",
    tag = "templates",
    security(("api_key" = [])),
    responses(
        (status = 200, body = TemplateList),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
    )
)]
async fn list(
    State(state): State<AppState>,
    Caller(caller): Caller,
) -> Result<Json<TemplateList>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    let templates = tenancy::list_templates(&mut conn, caller.team_id).await?;
    Ok(Json(TemplateList { templates }))
}
