//! Routes the host agents call: registration (join token), heartbeats and event reports
//! (host token). `Idempotency-Key` is not used here: registration is idempotent by host
//! name, heartbeats by nature, and reports by their `event_id`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use hangar_jobs::store::capsules;
use hangar_jobs::store::hosts::{self, Registration, Usage};
use hangar_jobs::{CapsuleId, HostId, OperationKind, enqueue, intents, keys};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::audit;
use crate::domain::HostName;
use crate::error::{ApiError, ErrorEnvelope};
use crate::extract::{HostCaller, JsonBody};

/// Most reports accepted in one request.
const MAX_EVENTS: usize = 1000;
/// Longer report messages are cut (they are diagnostics, not data).
const MAX_MESSAGE_CHARS: usize = 1024;

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(heartbeat))
        .routes(routes!(events))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    /// The cluster's join token (`HANGAR_JOIN_TOKEN`).
    join_token: String,
    name: String,
    address: String,
    driver: String,
    /// The bearer token workers present to this host's agent.
    agent_token: String,
    vcpus: i64,
    memory_mb: i64,
}

/// The host's id and its own token for the other host routes (shown once).
#[derive(Serialize, ToSchema)]
struct Registered {
    host_id: HostId,
    host_token: String,
}

/// How many reports became `host_event` operations (the rest were redelivered or moot).
#[derive(Serialize, ToSchema)]
struct ReportsAccepted {
    accepted: usize,
}

/// A registration, validated.
struct NewHost {
    name: HostName,
    address: String,
    driver: String,
    agent_token: String,
    vcpus: i32,
    memory_mb: i32,
}

fn text_field(field: &str, value: String, max: usize) -> Result<String, ApiError> {
    let chars = value.chars().count();
    if chars == 0 || chars > max || value.chars().any(char::is_control) {
        return Err(ApiError::InvalidRequest(format!(
            "`{field}` must be 1 to {max} characters, without control characters"
        )));
    }
    Ok(value)
}

fn count_field(field: &str, value: i64, min: i64, max: i64) -> Result<i32, ApiError> {
    if !(min..=max).contains(&value) {
        return Err(ApiError::InvalidRequest(format!(
            "`{field}` must be between {min} and {max} (got {value})"
        )));
    }
    Ok(value as i32)
}

impl TryFrom<RegisterBody> for NewHost {
    type Error = ApiError;

    fn try_from(b: RegisterBody) -> Result<Self, ApiError> {
        Ok(Self {
            name: HostName::try_from(b.name)?,
            address: text_field("address", b.address, 255)?,
            driver: text_field("driver", b.driver, 32)?,
            agent_token: text_field("agent_token", b.agent_token, 256)?,
            vcpus: count_field("vcpus", b.vcpus, 1, 1_000_000)?,
            memory_mb: count_field("memory_mb", b.memory_mb, 128, i64::from(i32::MAX))?,
        })
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct HeartbeatBody {
    vcpus_total: i64,
    memory_mb_total: i64,
    vcpus_used: i64,
    memory_mb_used: i64,
    /// How many sandboxes the host runs.
    sandboxes: u32,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct EventsBody {
    events: Vec<HostEvent>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct HostEvent {
    event_id: uuid::Uuid,
    /// Kept as text: a report about a sandbox that is no capsule is acknowledged and
    /// skipped, so it can never block the agent's delivery of the reports behind it.
    sandbox_id: String,
    kind: HostEventKind,
    #[serde(default)]
    message: String,
    at_ms: i64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
enum HostEventKind {
    Crashed,
    Exited,
    AutoPaused,
}

/// Registers a host agent (idempotent by host name).
#[utoipa::path(
    post,
    path = "/v1/hosts/register",
    tag = "hosts",
    request_body = RegisterBody,
    responses(
        (status = 200, body = Registered),
        (status = 400, description = "Invalid input", body = ErrorEnvelope),
        (status = 401, description = "Wrong join token", body = ErrorEnvelope),
    )
)]
async fn register(
    State(state): State<AppState>,
    body: JsonBody<RegisterBody>,
) -> Result<Json<Registered>, ApiError> {
    let body = body.value;
    if !keys::constant_time_eq(
        body.join_token.as_bytes(),
        state.config.join_token.as_bytes(),
    ) {
        return Err(ApiError::Unauthorized);
    }
    let host = NewHost::try_from(body)?;
    let host_token = keys::random_hex(32);
    let mut tx = state.pool.begin().await?;
    let host_id = hosts::register(
        &mut tx,
        Registration {
            name: host.name.as_str(),
            address: &host.address,
            driver: &host.driver,
            token_hash: &keys::hash_secret(&host_token),
            agent_token: &host.agent_token,
            vcpus: host.vcpus,
            memory_mb: host.memory_mb,
        },
    )
    .await?;
    let detail =
        json!({ "name": host.name.as_str(), "address": host.address, "driver": host.driver });
    audit::accepted(&mut tx, None, None, "host.register", host_id, detail).await?;
    tx.commit().await?;
    Ok(Json(Registered {
        host_id,
        host_token,
    }))
}

/// Reports that a host is alive, and its usage.
#[utoipa::path(
    post,
    path = "/v1/hosts/{id}/heartbeat",
    tag = "hosts",
    security(("host_token" = [])),
    params(("id" = HostId, Path)),
    request_body = HeartbeatBody,
    responses(
        (status = 200, description = "Recorded (`{}`)", body = Object),
        (status = 400, description = "Invalid input", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid host token", body = ErrorEnvelope),
        (status = 403, description = "Another host's token", body = ErrorEnvelope),
    )
)]
async fn heartbeat(
    State(state): State<AppState>,
    HostCaller(host): HostCaller,
    body: JsonBody<HeartbeatBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let b = body.value;
    let max = i64::from(i32::MAX);
    count_field("vcpus_total", b.vcpus_total, 0, max)?;
    count_field("memory_mb_total", b.memory_mb_total, 0, max)?;
    let usage = Usage {
        vcpus_used: count_field("vcpus_used", b.vcpus_used, 0, max)?,
        memory_mb_used: count_field("memory_mb_used", b.memory_mb_used, 0, max)?,
    };
    let mut conn = state.pool.acquire().await?;
    let came_back = hosts::heartbeat(&mut conn, host, usage).await?;
    if came_back {
        tracing::info!(host_id = %host, sandboxes = b.sandboxes, "host is reachable again");
    }
    Ok(Json(json!({})))
}

/// Applies each new report as a `host_event` operation; redelivered reports (same
/// `event_id`) and reports about capsules that are not on this host are skipped.
#[utoipa::path(
    post,
    path = "/v1/hosts/{id}/events",
    tag = "hosts",
    security(("host_token" = [])),
    params(("id" = HostId, Path)),
    request_body = EventsBody,
    responses(
        (status = 202, body = ReportsAccepted),
        (status = 400, description = "Invalid input", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid host token", body = ErrorEnvelope),
        (status = 403, description = "Another host's token", body = ErrorEnvelope),
    )
)]
async fn events(
    State(state): State<AppState>,
    HostCaller(host): HostCaller,
    body: JsonBody<EventsBody>,
) -> Result<(StatusCode, Json<ReportsAccepted>), ApiError> {
    let events = body.value.events;
    if events.len() > MAX_EVENTS {
        return Err(ApiError::InvalidRequest(format!(
            "`events` may hold at most {MAX_EVENTS} reports"
        )));
    }
    let mut jobs = Vec::new();
    let mut tx = state.pool.begin().await?;
    for event in events {
        if !hosts::record_host_event(&mut tx, host, event.event_id).await? {
            continue;
        }
        let Ok(capsule_id) = event.sandbox_id.parse::<CapsuleId>() else {
            tracing::warn!(host_id = %host, sandbox_id = %event.sandbox_id.chars().take(80).collect::<String>(), "report about a sandbox that is no capsule");
            continue;
        };
        let Some(capsule) = capsules::get(&mut tx, None, capsule_id).await? else {
            tracing::warn!(host_id = %host, %capsule_id, "report about an unknown capsule");
            continue;
        };
        if capsule.host_id != Some(host) {
            tracing::warn!(host_id = %host, capsule_id = %capsule.id, "report about a capsule on another host");
            continue;
        }
        let message: String = event.message.chars().take(MAX_MESSAGE_CHARS).collect();
        let params = json!({
            "event_id": event.event_id,
            "kind": event.kind,
            "message": message,
            "at_ms": event.at_ms,
        });
        let op = intents::host_report(&mut tx, &capsule, params).await?;
        jobs.push((OperationKind::HostEvent, op.id));
    }
    tx.commit().await?;
    if !jobs.is_empty() {
        enqueue::push_committed(&state.pool, &state.queue, &jobs).await;
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(ReportsAccepted {
            accepted: jobs.len(),
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration(patch: serde_json::Value) -> Result<NewHost, ApiError> {
        let mut body = json!({
            "join_token": "j", "name": "h1", "address": "10.0.0.1:7000", "driver": "sim",
            "agent_token": "t", "vcpus": 8, "memory_mb": 8192,
        });
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        let body: RegisterBody = serde_json::from_value(body).unwrap();
        NewHost::try_from(body)
    }

    #[test]
    fn registrations_are_validated() {
        assert!(registration(json!({})).is_ok());
        assert_eq!(
            registration(json!({"name": "a/b"})).err().unwrap().code(),
            "invalid_name"
        );
        assert_eq!(
            registration(json!({"address": ""})).err().unwrap().code(),
            "invalid_request"
        );
        assert_eq!(
            registration(json!({"vcpus": 0})).err().unwrap().code(),
            "invalid_request"
        );
        assert_eq!(
            registration(json!({"memory_mb": 1u64 << 40}))
                .err()
                .unwrap()
                .code(),
            "invalid_request"
        );
    }

    #[test]
    fn event_kinds_match_the_worker() {
        for kind in ["crashed", "exited", "auto_paused"] {
            let k: HostEventKind = serde_json::from_value(json!(kind)).unwrap();
            assert_eq!(json!(k), json!(kind));
        }
        assert!(serde_json::from_value::<HostEventKind>(json!("rebooted")).is_err());
    }
}
