//! Admin routes (platform admin keys): teams, their API keys, and hosts (cordon, drain).
//! Admin capsule routes live with the team ones in `capsules.rs`, operator actions on
//! operations in `admin_operations.rs`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use hangar_jobs::store::tenancy::{self, NewKey};
use hangar_jobs::store::{Capsule, Host, PgConnection, Principal, Team, capsules, hosts};
use hangar_jobs::{HostId, KeyId, TeamId, keys};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::audit;
use crate::domain::{KeyName, TeamName};
use crate::error::{ApiError, ErrorEnvelope};
use crate::extract::{Admin, Empty, IdempotencyKey, JsonBody, PathId};
use crate::idempotency::{Idempotency, Reply};

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_team))
        .routes(routes!(mint_key))
        .routes(routes!(list_hosts))
        .routes(routes!(cordon))
        .routes(routes!(uncordon))
        .routes(routes!(drain))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct TeamBody {
    name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct KeyBody {
    name: String,
    /// An admin key (platform team only).
    #[serde(default)]
    admin: bool,
}

/// A minted key. `key` is the secret, in this response only (null in a replay).
#[derive(Serialize, ToSchema)]
struct MintedKey {
    id: KeyId,
    /// The secret's first characters, to recognise it by.
    prefix: String,
    key: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct HostList {
    hosts: Vec<Host>,
}

/// Creates a team.
#[utoipa::path(
    post,
    path = "/v1/admin/teams",
    tag = "admin",
    security(("admin_key" = [])),
    params(IdempotencyKey),
    request_body = TeamBody,
    responses(
        (status = 201, body = Team),
        (status = 400, description = "Invalid input", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
        (status = 403, description = "Not an admin key", body = ErrorEnvelope),
        (status = 409, description = "A team of that name exists", body = ErrorEnvelope),
        (status = 422, description = "`Idempotency-Key` reused for another request", body = ErrorEnvelope),
    )
)]
async fn create_team(
    State(state): State<AppState>,
    Admin(actor): Admin,
    key: IdempotencyKey,
    body: JsonBody<TeamBody>,
) -> Result<Reply, ApiError> {
    let name = TeamName::try_from(body.value.name)?;
    let idem = Idempotency::new(actor.team_id, key, body.hash);
    let mut tx = state.pool.begin().await?;
    if let Some(reply) = idem.replay(&mut tx).await? {
        return Ok(reply);
    }
    let team = tenancy::create_team(&mut tx, name.as_str())
        .await?
        .ok_or_else(|| ApiError::NameTaken(name.as_str().to_owned()))?;
    audit::accepted(
        &mut tx,
        Some(&actor),
        Some(team.id),
        "team.create",
        team.id,
        json!({ "name": team.name }),
    )
    .await?;
    let reply = Reply::created(json!(team));
    idem.remember(&mut tx, &reply).await?;
    tx.commit().await?;
    Ok(reply)
}

/// Mints an API key; its secret is in this response only. A replay under the same
/// `Idempotency-Key` answers with the key's id and prefix and `"key": null`: the secret is
/// never stored.
#[utoipa::path(
    post,
    path = "/v1/admin/teams/{id}/keys",
    tag = "admin",
    security(("admin_key" = [])),
    params(("id" = TeamId, Path), IdempotencyKey),
    request_body = KeyBody,
    responses(
        (status = 201, body = MintedKey),
        (status = 400, description = "Invalid input", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
        (status = 403, description = "Not an admin key", body = ErrorEnvelope),
        (status = 404, description = "No such team", body = ErrorEnvelope),
        (status = 422, description = "`Idempotency-Key` reused for another request", body = ErrorEnvelope),
    )
)]
async fn mint_key(
    State(state): State<AppState>,
    Admin(actor): Admin,
    PathId(team_id): PathId<TeamId>,
    key: IdempotencyKey,
    body: JsonBody<KeyBody>,
) -> Result<Reply, ApiError> {
    let name = KeyName::try_from(body.value.name)?;
    let admin = body.value.admin;
    let idem = Idempotency::new(actor.team_id, key, body.hash);
    let mut tx = state.pool.begin().await?;
    if let Some(reply) = idem.replay(&mut tx).await? {
        return Ok(reply);
    }
    let team = tenancy::get_team(&mut tx, team_id)
        .await?
        .ok_or(ApiError::NotFound("team"))?;
    if admin && !team.is_platform {
        return Err(ApiError::InvalidRequest(
            "`admin` keys can only be minted for the platform team".into(),
        ));
    }
    let minted = keys::mint_api_key();
    let id = KeyId::new();
    tenancy::insert_key(
        &mut tx,
        NewKey {
            id,
            team_id,
            name: name.as_str(),
            prefix: &minted.prefix,
            key_hash: &minted.hash,
            is_admin: admin,
        },
    )
    .await?;
    audit::accepted(
        &mut tx,
        Some(&actor),
        Some(team_id),
        "key.create",
        id,
        json!({ "name": name.as_str(), "admin": admin, "prefix": minted.prefix }),
    )
    .await?;
    let stored = MintedKey {
        id,
        prefix: minted.prefix.clone(),
        key: None,
    };
    idem.remember_as(&mut tx, StatusCode::CREATED, &json!(stored))
        .await?;
    tx.commit().await?;
    Ok(Reply::created(json!(MintedKey {
        key: Some(minted.secret),
        ..stored
    })))
}

/// Every host, with its capacity and usage.
#[utoipa::path(
    get,
    path = "/v1/admin/hosts",
    tag = "admin",
    security(("admin_key" = [])),
    responses(
        (status = 200, body = HostList),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
        (status = 403, description = "Not an admin key", body = ErrorEnvelope),
    )
)]
async fn list_hosts(
    State(state): State<AppState>,
    Admin(_): Admin,
) -> Result<Json<HostList>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    let hosts = hosts::list(&mut conn).await?;
    Ok(Json(HostList { hosts }))
}

/// Stops placing new capsules on a host.
#[utoipa::path(
    post,
    path = "/v1/admin/hosts/{id}/cordon",
    tag = "admin",
    security(("admin_key" = [])),
    params(("id" = HostId, Path), IdempotencyKey),
    request_body(content = Empty, description = "None: send nothing, or `{}`"),
    responses(
        (status = 200, body = Host),
        (status = 400, description = "Invalid input", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
        (status = 403, description = "Not an admin key", body = ErrorEnvelope),
        (status = 404, description = "No such host", body = ErrorEnvelope),
        (status = 422, description = "`Idempotency-Key` reused for another request", body = ErrorEnvelope),
    )
)]
pub(crate) async fn cordon(
    State(state): State<AppState>,
    Admin(actor): Admin,
    PathId(id): PathId<HostId>,
    key: IdempotencyKey,
    body: JsonBody<Empty>,
) -> Result<Reply, ApiError> {
    set_cordoned(
        &state,
        &actor,
        id,
        true,
        Idempotency::new(actor.team_id, key, body.hash),
    )
    .await
}

/// Places new capsules on a host again.
#[utoipa::path(
    post,
    path = "/v1/admin/hosts/{id}/uncordon",
    tag = "admin",
    security(("admin_key" = [])),
    params(("id" = HostId, Path), IdempotencyKey),
    request_body(content = Empty, description = "None: send nothing, or `{}`"),
    responses(
        (status = 200, body = Host),
        (status = 400, description = "Invalid input", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
        (status = 403, description = "Not an admin key", body = ErrorEnvelope),
        (status = 404, description = "No such host", body = ErrorEnvelope),
        (status = 422, description = "`Idempotency-Key` reused for another request", body = ErrorEnvelope),
    )
)]
pub(crate) async fn uncordon(
    State(state): State<AppState>,
    Admin(actor): Admin,
    PathId(id): PathId<HostId>,
    key: IdempotencyKey,
    body: JsonBody<Empty>,
) -> Result<Reply, ApiError> {
    set_cordoned(
        &state,
        &actor,
        id,
        false,
        Idempotency::new(actor.team_id, key, body.hash),
    )
    .await
}

/// A drained host and what still runs on it.
#[derive(Serialize, ToSchema)]
struct Drained {
    host: Host,
    capsules: Vec<Capsule>,
}

/// Drains a host: cordons it (no new placements) and marks it draining, and answers with
/// the host and the capsules still on it. Nothing is destroyed or moved: the operator decides
/// what happens to them (`uncordon` ends the drain).
#[utoipa::path(
    post,
    path = "/v1/admin/hosts/{id}/drain",
    tag = "admin",
    security(("admin_key" = [])),
    params(("id" = HostId, Path), IdempotencyKey),
    request_body(content = Empty, description = "None: send nothing, or `{}`"),
    responses(
        (status = 200, body = Drained),
        (status = 400, description = "Invalid input", body = ErrorEnvelope),
        (status = 401, description = "Missing or invalid key", body = ErrorEnvelope),
        (status = 403, description = "Not an admin key", body = ErrorEnvelope),
        (status = 404, description = "No such host", body = ErrorEnvelope),
        (status = 422, description = "`Idempotency-Key` reused for another request", body = ErrorEnvelope),
    )
)]
pub(crate) async fn drain(
    State(state): State<AppState>,
    Admin(actor): Admin,
    PathId(id): PathId<HostId>,
    key: IdempotencyKey,
    body: JsonBody<Empty>,
) -> Result<Reply, ApiError> {
    let idem = Idempotency::new(actor.team_id, key, body.hash);
    let mut tx = state.pool.begin().await?;
    if let Some(reply) = idem.replay(&mut tx).await? {
        return Ok(reply);
    }
    if !hosts::drain(&mut tx, id).await? {
        return Err(ApiError::NotFound("host"));
    }
    let host = hosts::get(&mut tx, id)
        .await?
        .ok_or(ApiError::NotFound("host"))?;
    let remaining = capsules::on_host(&mut tx, id).await?;
    let detail = json!({ "capsules": remaining.len() });
    audit::accepted(&mut tx, Some(&actor), None, "host.drain", id, detail).await?;
    let reply = Reply::ok(
        serde_json::to_value(Drained {
            host,
            capsules: remaining,
        })
        .map_err(|e| ApiError::Internal(e.into()))?,
    );
    idem.remember(&mut tx, &reply).await?;
    tx.commit().await?;
    Ok(reply)
}

async fn set_cordoned(
    state: &AppState,
    actor: &Principal,
    id: HostId,
    cordoned: bool,
    idem: Idempotency,
) -> Result<Reply, ApiError> {
    let mut tx = state.pool.begin().await?;
    if let Some(reply) = idem.replay(&mut tx).await? {
        return Ok(reply);
    }
    let host = cordon_host(&mut tx, id, cordoned).await?;
    let action = if cordoned {
        "host.cordon"
    } else {
        "host.uncordon"
    };
    audit::accepted(&mut tx, Some(actor), None, action, id, json!({})).await?;
    let reply = Reply::ok(json!(host));
    idem.remember(&mut tx, &reply).await?;
    tx.commit().await?;
    Ok(reply)
}

async fn cordon_host(
    conn: &mut PgConnection,
    id: HostId,
    cordoned: bool,
) -> Result<Host, ApiError> {
    if !hosts::set_cordoned(conn, id, cordoned).await? {
        return Err(ApiError::NotFound("host"));
    }
    hosts::get(conn, id)
        .await?
        .ok_or(ApiError::NotFound("host"))
}
