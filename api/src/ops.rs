//! Liveness and readiness for load balancers and orchestrators.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use hangar_jobs::store;
use serde::Serialize;
use tokio::time::timeout;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
}

#[derive(Serialize, ToSchema)]
struct Health {
    #[schema(example = "ok")]
    status: &'static str,
}

/// Each dependency: `ok` or `unavailable`.
#[derive(Serialize, ToSchema)]
struct Readiness {
    status: &'static str,
    postgres: &'static str,
    redis: &'static str,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Readiness: 200 when Postgres and Redis both answer within the timeout, 503 otherwise.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "ops",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "A dependency did not answer", body = Readiness),
    )
)]
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let postgres = timeout(CHECK_TIMEOUT, async {
        let mut conn = state.pool.acquire().await?;
        store::ping(&mut conn).await?;
        anyhow::Ok(())
    });
    let redis = timeout(CHECK_TIMEOUT, async {
        let mut conn = state.queue.connection();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        anyhow::Ok(())
    });
    let (postgres, redis) = tokio::join!(postgres, redis);
    let verdict = |r: Result<anyhow::Result<()>, _>, what: &str| match r {
        Ok(Ok(())) => "ok",
        Ok(Err(error)) => {
            tracing::warn!(error = format!("{error:#}"), "{what} is not ready");
            "unavailable"
        }
        Err(_) => {
            tracing::warn!("{what} did not answer in time");
            "unavailable"
        }
    };
    let postgres = verdict(postgres, "postgres");
    let redis = verdict(redis, "redis");
    let ready = postgres == "ok" && redis == "ok";
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        status: if ready { "ok" } else { "unavailable" },
        postgres,
        redis,
    };
    (status, Json(body))
}
