//! The API's Prometheus metrics: request durations by route template, and the cluster's
//! state (capsules by status, queue depth per kind, per-host reservations), sampled from
//! Postgres and Redis when scraped, at most once per [`SAMPLE_TTL`] however many scrape.
//!
//! The registry is the process's: `hangar dev` registers the worker's and the agent's
//! metrics into it too, so one `/metrics` shows all three.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hangar_jobs::store::{capsules, hosts};
use hangar_jobs::{CapsuleStatus, OperationKind};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::Mutex;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;

/// Cluster state is sampled at most this often (scrapes of several Prometheus replicas,
/// or a fast scrape interval, cost one round of queries).
const SAMPLE_TTL: Duration = Duration::from_secs(1);

/// The OpenMetrics text format, which `prometheus_client` writes (Prometheus negotiates it).
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    /// The route template (`/v1/capsules/{id}`), never the raw path: bounded.
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

/// Host names are bounded by the fleet, which is what per-host panels need.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabel {
    host: String,
}

/// Per-host gauges from Postgres, in the order `sample_postgres` sets them.
const HOST_GAUGES: [(&str, &str); 4] = [
    (
        "hangar_host_vcpus_reserved",
        "vCPUs reserved on a host by its capsules",
    ),
    (
        "hangar_host_memory_mb_reserved",
        "Memory in MiB reserved on a host by its capsules",
    ),
    ("hangar_host_vcpus_total", "vCPUs a host offers"),
    ("hangar_host_memory_mb_total", "Memory in MiB a host offers"),
];

/// The API's metrics and the registry `/metrics` renders.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Histogram>,
    queue_depth: Family<KindLabel, Gauge>,
    capsules: Family<StatusLabel, Gauge>,
    /// In the order of [`HOST_GAUGES`].
    hosts: [Family<HostLabel, Gauge>; 4],
    sampled_at: Mutex<Option<Instant>>,
}

impl Metrics {
    /// Registers the API's metrics into `registry`, which may already hold others.
    pub fn new(mut registry: Registry) -> Self {
        let requests = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.5, 12))
        });
        registry.register(
            "hangar_http_request_duration_seconds",
            "Time to answer an HTTP request (to the response head), by method, route template and status",
            requests.clone(),
        );
        let queue_depth = Family::default();
        registry.register(
            "hangar_queue_depth",
            "Entries on a job kind's Redis stream (not yet acknowledged)",
            queue_depth.clone(),
        );
        let capsules = Family::default();
        registry.register("hangar_capsules", "Capsules by status", capsules.clone());
        let hosts: [Family<HostLabel, Gauge>; 4] = Default::default();
        for (family, (name, help)) in hosts.iter().zip(HOST_GAUGES) {
            registry.register(name, help, family.clone());
        }
        Self {
            registry,
            requests,
            queue_depth,
            capsules,
            hosts,
            sampled_at: Mutex::new(None),
        }
    }

    /// Refreshes the sampled gauges unless they are fresh. A failed source keeps its last
    /// values (the scrape still answers; the log says why).
    async fn sample(&self, state: &AppState) {
        let mut sampled_at = self.sampled_at.lock().await;
        if sampled_at.is_some_and(|at| at.elapsed() < SAMPLE_TTL) {
            return;
        }
        *sampled_at = Some(Instant::now());
        for kind in OperationKind::ALL.iter().copied() {
            match state.queue.depth(kind).await {
                Ok(depth) => {
                    let depth = i64::try_from(depth).unwrap_or(i64::MAX);
                    self.queue_depth
                        .get_or_create(&KindLabel {
                            kind: kind.as_str(),
                        })
                        .set(depth);
                }
                Err(error) => tracing::warn!(%error, "sampling the queue depth failed"),
            }
        }
        if let Err(error) = self.sample_postgres(state).await {
            tracing::warn!(%error, "sampling capsules and hosts failed");
        }
    }

    async fn sample_postgres(&self, state: &AppState) -> anyhow::Result<()> {
        let mut conn = state.pool.acquire().await?;
        let counts = capsules::count_by_status(&mut conn).await?;
        let hosts = hosts::list(&mut conn).await?;
        // Every status is exported, absent ones as 0, so a status that empties drops to 0.
        for status in CapsuleStatus::ALL.iter().copied() {
            let count = counts.iter().find(|(s, _)| *s == status).map_or(0, |c| c.1);
            self.capsules
                .get_or_create(&StatusLabel {
                    status: status.as_str(),
                })
                .set(count);
        }
        // Removed hosts disappear rather than keep their last values.
        for family in &self.hosts {
            family.clear();
        }
        for h in hosts {
            let label = HostLabel { host: h.name };
            let values = [
                h.vcpus_reserved,
                h.memory_mb_reserved,
                h.vcpus_total,
                h.memory_mb_total,
            ];
            for (family, value) in self.hosts.iter().zip(values) {
                family.get_or_create(&label).set(value.into());
            }
        }
        Ok(())
    }
}

/// Renders a registry in the OpenMetrics text format (also used by the worker's and the
/// agent's own `/metrics` listeners).
pub fn render(registry: &Registry) -> Response {
    let mut body = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut body, registry) {
        tracing::error!(%error, "encoding metrics failed");
        return axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    ([(CONTENT_TYPE, CONTENT_TYPE_OPENMETRICS)], body).into_response()
}

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(scrape))
}

/// `GET /metrics`: Prometheus scrapes it (no key: it shows counts and host names, no ids).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    responses((status = 200, description = "Metrics in the OpenMetrics text format",
               content_type = "application/openmetrics-text", body = String))
)]
pub(crate) async fn scrape(State(state): State<AppState>) -> Response {
    let metrics = state.metrics.clone();
    metrics.sample(&state).await;
    render(&metrics.registry)
}

/// Extension methods would make the label unbounded.
fn method_label(method: &Method) -> &'static str {
    [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
    ]
    .iter()
    .find(|m| *m == method)
    .map_or("other", |m| m.as_str())
}

/// Times every routed request by its route template (a `route_layer`, so unknown paths,
/// which have no template, are not recorded).
pub(crate) async fn track(
    State(metrics): State<Arc<Metrics>>,
    req: Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    // Extension methods would make the label unbounded.
    let method = method_label(req.method());
    let response = next.run(req).await;
    let labels = RequestLabels {
        method,
        route,
        status: response.status().as_u16(),
    };
    metrics
        .requests
        .get_or_create(&labels)
        .observe(start.elapsed().as_secs_f64());
    response
}
