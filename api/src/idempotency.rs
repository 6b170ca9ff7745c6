//! `Idempotency-Key` on POSTs. Inside the request's transaction, the stored response for
//! (team, key) is looked up first, under an advisory lock so concurrent first uses of a key
//! serialise. The same request (same hash of method, path and body) gets the stored status
//! and body back and creates nothing; a different request gets 422. A fresh request stores
//! its response before commit, so a failed request (rolled back) stores nothing.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hangar_jobs::TeamId;
use hangar_jobs::intents::Accepted;
use hangar_jobs::store::records::{self, StoredResponse};
use hangar_jobs::store::{Capsule, Operation, PgConnection};
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::extract::IdempotencyKey;

/// A successful answer, as sent and as stored for replay.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    pub status: StatusCode,
    pub body: serde_json::Value,
}

impl Reply {
    pub(crate) fn ok(body: serde_json::Value) -> Self {
        Self {
            status: StatusCode::OK,
            body,
        }
    }

    pub(crate) fn created(body: serde_json::Value) -> Self {
        Self {
            status: StatusCode::CREATED,
            body,
        }
    }

    /// 202 with the job handle and the capsule as it now is.
    pub(crate) fn accepted(accepted: &Accepted) -> Self {
        Self {
            status: StatusCode::ACCEPTED,
            body: json!(AcceptedBody {
                operation: accepted.operation.clone(),
                capsule: accepted.capsule.clone(),
            }),
        }
    }

    /// `Location` of a 202: the operation to poll.
    fn location(&self) -> Option<String> {
        if self.status != StatusCode::ACCEPTED {
            return None;
        }
        let id = self.body.get("operation")?.get("id")?.as_str()?;
        Some(format!("/v1/operations/{id}"))
    }

    fn from_stored(stored: StoredResponse) -> Self {
        Self {
            status: u16::try_from(stored.status_code)
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::OK),
            body: stored.response,
        }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let location = self.location();
        let mut response = (self.status, Json(self.body)).into_response();
        if let Some(value) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
            response.headers_mut().insert(header::LOCATION, value);
        }
        response
    }
}

/// The body of a 202: the job handle (`Location` points at it) and the capsule as it now is.
#[derive(Serialize, ToSchema)]
pub(crate) struct AcceptedBody {
    operation: Operation,
    capsule: Capsule,
}

/// The idempotency context of one POST.
pub(crate) struct Idempotency {
    team: TeamId,
    key: Option<String>,
    hash: Vec<u8>,
}

impl Idempotency {
    pub(crate) fn new(team: TeamId, key: IdempotencyKey, request_hash: Vec<u8>) -> Self {
        Self {
            team,
            key: key.0,
            hash: request_hash,
        }
    }

    /// The stored reply of an earlier identical request, if any; 422 when the key was
    /// used for a different request. Call first in the transaction.
    pub(crate) async fn replay(&self, conn: &mut PgConnection) -> Result<Option<Reply>, ApiError> {
        let Some(key) = &self.key else {
            return Ok(None);
        };
        match records::idempotent_response(conn, self.team, key).await? {
            None => Ok(None),
            Some(stored) if stored.request_hash == self.hash => {
                Ok(Some(Reply::from_stored(stored)))
            }
            Some(_) => Err(ApiError::IdempotencyKeyReused),
        }
    }

    /// Stores `reply` under the key (if any); call last, before commit.
    pub(crate) async fn remember(
        &self,
        conn: &mut PgConnection,
        reply: &Reply,
    ) -> Result<(), ApiError> {
        self.remember_as(conn, reply.status, &reply.body).await
    }

    /// Stores a different body than the one sent (to keep a secret out of the table).
    pub(crate) async fn remember_as(
        &self,
        conn: &mut PgConnection,
        status: StatusCode,
        body: &serde_json::Value,
    ) -> Result<(), ApiError> {
        let Some(key) = &self.key else {
            return Ok(());
        };
        records::store_idempotent_response(
            conn,
            self.team,
            key,
            &self.hash,
            i32::from(status.as_u16()),
            body,
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_replies_point_at_their_operation() {
        let reply = Reply {
            status: StatusCode::ACCEPTED,
            body: json!({ "operation": { "id": "op_1" }, "capsule": {} }),
        };
        assert_eq!(reply.location().as_deref(), Some("/v1/operations/op_1"));
        let response = reply.into_response();
        assert_eq!(response.headers()[header::LOCATION], "/v1/operations/op_1");
        assert!(Reply::ok(json!({})).location().is_none());
    }

    #[test]
    fn stored_replies_keep_their_status() {
        let reply = Reply::from_stored(StoredResponse {
            request_hash: vec![],
            status_code: 201,
            response: json!({ "id": "team_1" }),
        });
        assert_eq!(reply.status, StatusCode::CREATED);
    }
}
