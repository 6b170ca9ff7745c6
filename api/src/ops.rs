//! Liveness and readiness for load balancers and orchestrators.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use hangar_jobs::store;
use serde_json::json;
use tokio::time::timeout;

use crate::AppState;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// 200 when Postgres and Redis both answer within the timeout, 503 otherwise.
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
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
    let body = json!({
        "status": if ready { "ok" } else { "unavailable" },
        "postgres": postgres,
        "redis": redis,
    });
    (status, Json(body))
}
