//! Hangar's HTTP API: axum routers per resource, merged here, over the `hangar-jobs` domain.
//!
//! A lifecycle request is validated into domain values, written as one Postgres transaction
//! (the capsule's conditional transition, the operation row, an event, an audit row and the
//! idempotent response), committed, and only then pushed to Redis; the answer is
//! `202 {operation, capsule}` with `Location: /v1/operations/{id}`. This crate holds no SQL:
//! every query is a named function of `hangar_jobs::store`.

mod admin;
mod admin_operations;
mod audit;
mod cache;
mod capsules;
mod dashboard;
mod docs;
mod domain;
pub mod error;
mod events;
mod extract;
mod hosts;
mod idempotency;
pub mod metrics;
mod operations;
mod ops;
mod templates;
mod waiters;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Request};
use axum::middleware;
use hangar_jobs::KeyId;
use hangar_jobs::keys;
use hangar_jobs::queue::JobQueue;
use hangar_jobs::store::PgPool;
use hangar_jobs::store::tenancy::{self, NewKey, PLATFORM_TEAM};
use prometheus_client::registry::Registry;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa_axum::router::OpenApiRouter;

pub use error::ApiError;

use crate::waiters::{ListenerTask, Waiters};

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Configuration of the API server (flags or `HANGAR_*` environment variables).
#[derive(Clone, clap::Args)]
pub struct ApiConfig {
    /// Address the API listens on.
    #[arg(long, env = "HANGAR_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The secret host agents present to register.
    #[arg(long, env = "HANGAR_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: String,
    /// How many times a job is attempted before its operation fails.
    #[arg(long, env = "HANGAR_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: i32,
    /// Largest accepted request body.
    #[arg(long, env = "HANGAR_BODY_LIMIT_BYTES", default_value_t = 64 * 1024)]
    pub body_limit_bytes: usize,
}

impl ApiConfig {
    /// The defaults (5 attempts, 64 KiB bodies) with the given address and join token.
    pub fn new(listen: SocketAddr, join_token: impl Into<String>) -> Self {
        Self {
            listen,
            join_token: join_token.into(),
            max_attempts: 5,
            body_limit_bytes: 64 * 1024,
        }
    }
}

// The join token is a secret: never print it.
impl fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiConfig")
            .field("listen", &self.listen)
            .field("join_token", &"<redacted>")
            .field("max_attempts", &self.max_attempts)
            .field("body_limit_bytes", &self.body_limit_bytes)
            .finish()
    }
}

/// What every handler shares; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub(crate) pool: PgPool,
    pub(crate) queue: JobQueue,
    pub(crate) config: Arc<ApiConfig>,
    pub(crate) waiters: Arc<Waiters>,
    /// Known API keys by hash (unknown keys always ask the database).
    pub(crate) principals: Arc<cache::TtlCache<Vec<u8>, hangar_jobs::store::Principal>>,
    /// Base-image templates by team and name (snapshot templates are always looked up).
    pub(crate) image_templates:
        Arc<cache::TtlCache<(hangar_jobs::TeamId, String), hangar_jobs::store::Template>>,
    /// Clients of the host agents, for `exec`.
    pub(crate) agents: hangar_jobs::agents::AgentPool,
    /// The process's metrics registry and the API's own metrics in it.
    pub(crate) metrics: Arc<metrics::Metrics>,
    /// Stops the LISTEN task when the last clone of the state is dropped.
    _listener: Arc<ListenerTask>,
}

impl AppState {
    /// Builds the state and starts the task that LISTENs for finished operations (it wakes
    /// `?wait=` long polls); LISTEN is in place when this returns.
    pub async fn new(pool: PgPool, queue: JobQueue, config: ApiConfig) -> anyhow::Result<Self> {
        anyhow::ensure!(config.max_attempts >= 1, "max_attempts must be at least 1");
        anyhow::ensure!(
            !config.join_token.is_empty(),
            "the join token must not be empty"
        );
        let waiters = Arc::new(Waiters::default());
        let listener = waiters::listen(&pool, waiters.clone())
            .await
            .context("listening for finished operations")?;
        Ok(Self {
            pool,
            queue,
            config: Arc::new(config),
            waiters,
            principals: Arc::default(),
            image_templates: Arc::default(),
            agents: hangar_jobs::agents::AgentPool::new(std::time::Duration::from_secs(
                capsules::MAX_EXEC_TIMEOUT_SECS + 30,
            )),
            metrics: Arc::new(metrics::Metrics::new(Registry::default())),
            _listener: Arc::new(listener),
        })
    }

    /// Serves `registry` at `/metrics` with the API's metrics added to it: how `hangar dev`
    /// shows the worker's and the agent's metrics beside the API's.
    pub fn with_registry(mut self, registry: Registry) -> Self {
        self.metrics = Arc::new(metrics::Metrics::new(registry));
        self
    }

    /// How many `?wait=` requests are parked right now (for tests and metrics).
    pub fn parked_waiters(&self) -> usize {
        self.waiters.parked()
    }
}

/// Every route, each registered together with its OpenAPI operation (`routes!`), so the
/// router and the document at `/openapi.json` come from this one list and cannot drift.
pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(docs::base())
        .merge(capsules::router())
        .merge(capsules::admin_router())
        .merge(operations::router())
        .merge(events::router())
        .merge(templates::router())
        .merge(admin::router())
        .merge(admin_operations::router())
        .merge(hosts::router())
        .merge(ops::router())
        .merge(metrics::router())
        .merge(docs::router())
        .merge(dashboard::router())
}

/// The whole API: every route, the envelope for unknown routes and methods, request ids,
/// tracing and the body limit.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.body_limit_bytes;
    let trace = TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
        // Headers are not recorded: Authorization never reaches the logs.
        let request_id = req
            .headers()
            .get(&REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        let span = tracing::info_span!(
            "http",
            method = %req.method(),
            path = %req.uri().path(),
            request_id,
        );
        // A caller that is itself traced makes this request part of its trace.
        hangar_proto::trace_context::set_parent_from_headers(&span, req.headers());
        span
    });
    let (routes, _document) = routes().split_for_parts();
    routes
        .route_layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            metrics::track,
        ))
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(trace)
                .layer(PropagateRequestIdLayer::new(REQUEST_ID)),
        )
        .with_state(state)
}

/// Serves the API until `shutdown` resolves, then drains in-flight requests (parked
/// `?wait=` polls answer at once with the operation as it is).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let waiters = state.waiters.clone();
    let app = router(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            waiters.close();
        })
        .await
        .context("serving the API")
}

/// Stores the hash of a fixed admin key of the platform team (idempotent).
pub async fn ensure_admin_key(pool: &PgPool, secret: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !secret.is_empty() && !secret.chars().any(|c| c.is_whitespace() || c.is_control()),
        "the admin key must be non-empty, without spaces or control characters"
    );
    let mut conn = pool.acquire().await.context("connecting to Postgres")?;
    tenancy::insert_key(
        &mut conn,
        NewKey {
            id: KeyId::new(),
            team_id: PLATFORM_TEAM,
            name: "admin",
            // Not a minted `hk_` key: showing its first characters would reveal too much.
            prefix: "admin",
            key_hash: &keys::hash_secret(secret),
            is_admin: true,
        },
    )
    .await
    .context("storing the admin key")?;
    Ok(())
}
