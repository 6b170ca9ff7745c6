//! Extractors whose rejections use the error envelope: callers (API key, admin key, host
//! token), the JSON body (hashed for idempotency), query strings, path ids and the
//! `Idempotency-Key` header.

use std::str::FromStr;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use hangar_jobs::store::{Principal, hosts, tenancy};
use hangar_jobs::{HostId, IdError, keys};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use utoipa::IntoParams;

use crate::AppState;
use crate::error::ApiError;

/// Longest bearer secret looked up (keys and tokens are far shorter).
const MAX_SECRET_LEN: usize = 256;
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// The secret of `Authorization: Bearer <secret>`, if well-formed.
fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, secret) = value.split_once(' ')?;
    let secret = secret.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !secret.is_empty() && secret.len() <= MAX_SECRET_LEN)
        .then_some(secret)
}

/// Any valid, unrevoked API key. Admin keys belong to the platform team and act as it.
pub(crate) struct Caller(pub Principal);

impl Caller {
    /// Admin keys of the platform team see every team's operations.
    pub(crate) fn is_admin(&self) -> bool {
        self.0.is_admin && self.0.is_platform
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let secret = bearer(parts).ok_or(ApiError::Unauthorized)?;
        let hash = keys::hash_secret(secret);
        if let Some(principal) = state.principals.get(&hash) {
            return Ok(Caller(principal));
        }
        let mut conn = state.pool.acquire().await?;
        let principal = tenancy::principal_by_key_hash(&mut conn, &hash)
            .await?
            .ok_or(ApiError::Unauthorized)?;
        state.principals.insert(hash, principal.clone());
        Ok(Caller(principal))
    }
}

/// An admin key of the platform team; any other valid key is forbidden.
pub(crate) struct Admin(pub Principal);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        if !caller.is_admin() {
            return Err(ApiError::Forbidden("this route needs an admin key"));
        }
        Ok(Admin(caller.0))
    }
}

/// The host named by the path, authenticated by its own bearer token. Another host's token
/// is forbidden; anything else is unauthorized.
pub(crate) struct HostCaller(pub HostId);

impl FromRequestParts<AppState> for HostCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let PathId(id) = PathId::<HostId>::from_request_parts(parts, state).await?;
        let secret = bearer(parts).ok_or(ApiError::Unauthorized)?;
        let hash = keys::hash_secret(secret);
        let mut conn = state.pool.acquire().await?;
        if let Some(expected) = hosts::token_hash(&mut conn, id).await?
            && keys::constant_time_eq(&expected, &hash)
        {
            return Ok(HostCaller(id));
        }
        match hosts::by_token_hash(&mut conn, &hash).await? {
            Some(_) => Err(ApiError::Forbidden("this token belongs to another host")),
            None => Err(ApiError::Unauthorized),
        }
    }
}

/// A typed id from the one path parameter; malformed → 400 `invalid_id`.
pub(crate) struct PathId<T>(pub T);

impl<S, T> FromRequestParts<S> for PathId<T>
where
    S: Send + Sync,
    T: FromStr<Err = IdError>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::InvalidId(e.body_text()))?;
        raw.parse()
            .map(PathId)
            .map_err(|e: IdError| ApiError::InvalidId(e.to_string()))
    }
}

/// A query string into `T` (whose fields are strings, parsed by the handler so errors name
/// the parameter); an unknown parameter → 400 `invalid_request`.
pub(crate) struct QueryParams<T>(pub T);

impl<S, T> FromRequestParts<S> for QueryParams<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        Query::<T>::try_from_uri(&parts.uri)
            .map(|Query(q)| QueryParams(q))
            .map_err(|e| ApiError::InvalidRequest(e.body_text()))
    }
}

/// The optional `Idempotency-Key` header (1..=255 visible characters).
#[derive(Debug, Clone, Default, IntoParams)]
#[into_params(names("Idempotency-Key"), parameter_in = Header)]
pub(crate) struct IdempotencyKey(
    /// Retrying with the same key returns the first answer and does nothing again; reusing
    /// it for a different request is 422.
    pub Option<String>,
);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get("idempotency-key") else {
            return Ok(IdempotencyKey(None));
        };
        let invalid = || {
            ApiError::InvalidRequest(format!(
                "`Idempotency-Key` must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"
            ))
        };
        let key = value.to_str().map_err(|_| invalid())?;
        if key.is_empty()
            || key.len() > MAX_IDEMPOTENCY_KEY_LEN
            || !key.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(invalid());
        }
        Ok(IdempotencyKey(Some(key.to_owned())))
    }
}

/// A JSON body parsed into a request DTO (with `deny_unknown_fields`), and the hash of the
/// request (method, path, raw body) for idempotency. An empty body reads as `{}`.
pub(crate) struct JsonBody<T> {
    pub value: T,
    pub hash: Vec<u8>,
}

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let mut hasher = Sha256::new();
        hasher.update(req.method().as_str());
        hasher.update(b"\n");
        hasher.update(req.uri().path());
        hasher.update(b"\n");
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(state.config.body_limit_bytes)
            } else {
                ApiError::InvalidJson(rejection.body_text())
            }
        })?;
        hasher.update(&bytes);
        let raw: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        let value =
            serde_json::from_slice(raw).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
        Ok(JsonBody {
            value,
            hash: hasher.finalize().to_vec(),
        })
    }
}

/// The body of routes that take none: nothing, or `{}`.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Empty {}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;

    fn parts(auth: Option<&str>) -> Parts {
        let mut builder = Request::builder().uri("/v1/capsules");
        if let Some(auth) = auth {
            builder = builder.header(header::AUTHORIZATION, auth);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer(&parts(Some("Bearer hk_abc"))), Some("hk_abc"));
        assert_eq!(bearer(&parts(Some("bearer  hk_abc "))), Some("hk_abc"));
        assert_eq!(bearer(&parts(Some("Basic hk_abc"))), None);
        assert_eq!(bearer(&parts(Some("Bearer "))), None);
        assert_eq!(bearer(&parts(Some("hk_abc"))), None);
        assert_eq!(bearer(&parts(None)), None);
        let long = format!("Bearer {}", "x".repeat(MAX_SECRET_LEN + 1));
        assert_eq!(bearer(&parts(Some(&long))), None);
    }
}
