//! The one error type of the API and its envelope:
//! `{"error": {"code": "...", "message": "..."}}` (plus `operation_id` for
//! `operation_in_progress`).
//!
//! Codes are stable; clients branch on them. Database and internal errors become an opaque
//! 500 `internal`: their detail is logged once, here, and never sent.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hangar_jobs::OperationId;
use hangar_jobs::intents::IntentError;
use hangar_jobs::store::StoreError;
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;

/// Why a request failed. Every variant maps to one status and one stable code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON, has an unknown field, or a field of the wrong type.
    #[error("{0}")]
    InvalidJson(String),
    /// A field or parameter is out of its allowed range; the message names it.
    #[error("{0}")]
    InvalidRequest(String),
    /// A path id is malformed.
    #[error("{0}")]
    InvalidId(String),
    #[error("unknown template `{0}`")]
    UnknownTemplate(String),
    /// A name (template, team, key, host) is not acceptable.
    #[error("{0}")]
    InvalidName(String),
    /// Missing, wrong or revoked credentials (the message does not say which).
    #[error("missing or invalid credentials")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(&'static str),
    /// No such resource, or it belongs to another team.
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("no route for this path")]
    NoRoute,
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    #[error("{0}")]
    InvalidState(String),
    #[error("operation {operation} is already in progress on this capsule")]
    OperationInProgress { operation: OperationId },
    #[error("a team named `{0}` already exists")]
    NameTaken(String),
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyKeyReused,
    /// The capsule's host agent did not answer; retrying later may work.
    #[error("the capsule's host is unavailable: {0}")]
    HostUnavailable(String),
    /// Anything the client cannot act on; logged, never shown.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson(_)
            | ApiError::InvalidRequest(_)
            | ApiError::InvalidId(_)
            | ApiError::UnknownTemplate(_)
            | ApiError::InvalidName(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) | ApiError::NoRoute => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::InvalidState(_)
            | ApiError::OperationInProgress { .. }
            | ApiError::NameTaken(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::HostUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::InvalidId(_) => "invalid_id",
            ApiError::UnknownTemplate(_) => "unknown_template",
            ApiError::InvalidName(_) => "invalid_name",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) | ApiError::NoRoute => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::InvalidState(_) => "invalid_state",
            ApiError::OperationInProgress { .. } => "operation_in_progress",
            ApiError::NameTaken(_) => "name_taken",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::IdempotencyKeyReused => "idempotency_key_reused",
            ApiError::HostUnavailable(_) => "host_unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Internal(e.into())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if raced_for_the_capsule(&e) {
            return ApiError::InvalidState(
                "another request on this capsule was accepted at the same moment; retry to get \
                 its operation"
                    .into(),
            );
        }
        ApiError::Internal(e.into())
    }
}

/// Two concurrent requests on one capsule both passed the in-flight check, and the second
/// hit the index that allows one operation in flight (or one destroy): a conflict, not a
/// server error.
fn raced_for_the_capsule(e: &StoreError) -> bool {
    match e {
        StoreError::Database(sqlx::Error::Database(db)) => matches!(
            db.constraint(),
            Some("operations_one_in_flight" | "operations_one_destroy")
        ),
        _ => false,
    }
}

impl From<IntentError> for ApiError {
    fn from(e: IntentError) -> Self {
        match e {
            IntentError::InvalidState { .. } => ApiError::InvalidState(e.to_string()),
            IntentError::InProgress { operation } => ApiError::OperationInProgress { operation },
            IntentError::Refused(message) => ApiError::InvalidState(message),
            IntentError::Store(store) => store.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let ApiError::Internal(error) = &self {
            // The one place a failed request's cause is logged (inside the request's span).
            tracing::error!(error = format!("{error:#}"), "request failed");
        }
        (status, Json(self.envelope())).into_response()
    }
}

/// The body of every error response (and its schema in the OpenAPI document).
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Stable and machine-readable: `invalid_json`, `invalid_request`, `invalid_id`,
    /// `invalid_name`, `unknown_template`, `unauthorized`, `forbidden`, `not_found`,
    /// `method_not_allowed`, `invalid_state`, `operation_in_progress`, `name_taken`,
    /// `payload_too_large`, `idempotency_key_reused`, `host_unavailable`, `internal`.
    #[schema(example = "invalid_state")]
    pub code: &'static str,
    /// For people; may change between versions.
    pub message: String,
    /// The operation in flight (`operation_in_progress` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<OperationId>,
}

impl ApiError {
    /// The JSON body: `{"error": {"code", "message"[, "operation_id"]}}`.
    pub fn envelope(&self) -> serde_json::Value {
        let operation_id = match self {
            ApiError::OperationInProgress { operation } => Some(*operation),
            _ => None,
        };
        json!(ErrorEnvelope {
            error: ErrorBody {
                code: self.code(),
                message: self.to_string(),
                operation_id,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(e: ApiError) -> (StatusCode, serde_json::Value) {
        (e.status(), e.envelope()["error"].clone())
    }

    #[test]
    fn internal_errors_are_opaque() {
        let (status, error) = body(ApiError::Internal(anyhow::anyhow!(
            "connection to 10.0.0.5:5432 refused, password=hunter2"
        )));
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(error["code"], "internal");
        assert_eq!(error["message"], "internal error");
    }

    #[test]
    fn in_progress_carries_the_operation_id() {
        let op = OperationId::new();
        let (status, error) = body(IntentError::InProgress { operation: op }.into());
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(error["code"], "operation_in_progress");
        assert_eq!(error["operation_id"], op.to_string());
    }

    #[test]
    fn store_errors_become_internal() {
        let e: ApiError =
            IntentError::Store(StoreError::Database(sqlx::Error::PoolTimedOut)).into();
        assert_eq!(e.code(), "internal");
    }
}
