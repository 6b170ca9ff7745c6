//! The dashboard's actions. Each checks the session's CSRF token, then calls the admin API's
//! handler for the same action with the session's admin key as the actor, so it takes the
//! same conditional path and writes the same audit row. The outcome comes back as a notice
//! on the page the action was sent from.

use axum::Form;
use axum::extract::State;
use axum::response::{IntoResponse, Redirect, Response};
use hangar_jobs::{HostId, OperationId};
use serde::Deserialize;

use super::page::encode;
use super::{CsrfRefused, Operator};
use crate::error::ApiError;
use crate::extract::{Admin, Empty, IdempotencyKey, JsonBody, PathId};
use crate::idempotency::Reply;
use crate::{AppState, admin, admin_operations};

#[derive(Deserialize)]
pub(super) struct ActionForm {
    csrf: String,
    /// The dashboard page to return to.
    back: Option<String>,
}

type Outcome = Result<Response, CsrfRefused>;

/// Back to the page the form came from (only a dashboard page), with the outcome.
fn done(form: &ActionForm, result: Result<Reply, ApiError>, success: &str) -> Response {
    let back = form
        .back
        .as_deref()
        .filter(|b| b.starts_with("/dashboard") && !b.contains("//") && !b.contains('\\'))
        .unwrap_or("/dashboard");
    let notice = match result {
        Ok(_) => success.to_owned(),
        Err(error) => format!("Refused ({}): {error}", error.code()),
    };
    let sep = if back.contains('?') { '&' } else { '?' };
    Redirect::to(&format!("{back}{sep}notice={}", encode(&notice))).into_response()
}

/// The arguments the admin handlers take, for a request with no body and no idempotency key.
fn admin_args(operator: &Operator) -> (Admin, IdempotencyKey, JsonBody<Empty>) {
    let body = JsonBody {
        value: Empty {},
        hash: Vec::new(),
    };
    (
        Admin(operator.principal.clone()),
        IdempotencyKey(None),
        body,
    )
}

/// Retries a failed operation (as a new operation).
#[utoipa::path(post, path = "/dashboard/operations/{id}/retry", tag = "dashboard",
    params(("id" = OperationId, Path)),
    request_body(content = String, description = "`csrf=<token>&back=<page>`", content_type = "application/x-www-form-urlencoded"),
    responses((status = 303, description = "Back to the page, with the outcome")))]
pub(super) async fn retry(
    State(state): State<AppState>,
    operator: Operator,
    PathId(id): PathId<OperationId>,
    Form(form): Form<ActionForm>,
) -> Outcome {
    operator.check_csrf(&form.csrf)?;
    let (admin, key, body) = admin_args(&operator);
    let result = admin_operations::retry(State(state), admin, PathId(id), key, body).await;
    let message = match &result {
        Ok(reply) => format!(
            "Retry accepted as operation {}.",
            reply.body["operation"]["id"].as_str().unwrap_or("?")
        ),
        Err(_) => String::new(),
    };
    Ok(done(&form, result, &message))
}

/// Cancels a queued operation.
#[utoipa::path(post, path = "/dashboard/operations/{id}/cancel", tag = "dashboard",
    params(("id" = OperationId, Path)),
    request_body(content = String, description = "`csrf=<token>&back=<page>`", content_type = "application/x-www-form-urlencoded"),
    responses((status = 303, description = "Back to the page, with the outcome")))]
pub(super) async fn cancel(
    State(state): State<AppState>,
    operator: Operator,
    PathId(id): PathId<OperationId>,
    Form(form): Form<ActionForm>,
) -> Outcome {
    operator.check_csrf(&form.csrf)?;
    let (admin, key, body) = admin_args(&operator);
    let result = admin_operations::cancel(State(state), admin, PathId(id), key, body).await;
    Ok(done(&form, result, &format!("Operation {id} cancelled.")))
}

/// Stops placing new capsules on a host.
#[utoipa::path(post, path = "/dashboard/hosts/{id}/cordon", tag = "dashboard",
    params(("id" = HostId, Path)),
    request_body(content = String, description = "`csrf=<token>&back=<page>`", content_type = "application/x-www-form-urlencoded"),
    responses((status = 303, description = "Back to the page, with the outcome")))]
pub(super) async fn cordon(
    State(state): State<AppState>,
    operator: Operator,
    PathId(id): PathId<HostId>,
    Form(form): Form<ActionForm>,
) -> Outcome {
    operator.check_csrf(&form.csrf)?;
    let (admin, key, body) = admin_args(&operator);
    let result = admin::cordon(State(state), admin, PathId(id), key, body).await;
    Ok(done(
        &form,
        result,
        "Host cordoned: no new capsules are placed on it.",
    ))
}

/// Places new capsules on a host again (and ends a drain).
#[utoipa::path(post, path = "/dashboard/hosts/{id}/uncordon", tag = "dashboard",
    params(("id" = HostId, Path)),
    request_body(content = String, description = "`csrf=<token>&back=<page>`", content_type = "application/x-www-form-urlencoded"),
    responses((status = 303, description = "Back to the page, with the outcome")))]
pub(super) async fn uncordon(
    State(state): State<AppState>,
    operator: Operator,
    PathId(id): PathId<HostId>,
    Form(form): Form<ActionForm>,
) -> Outcome {
    operator.check_csrf(&form.csrf)?;
    let (admin, key, body) = admin_args(&operator);
    let result = admin::uncordon(State(state), admin, PathId(id), key, body).await;
    Ok(done(&form, result, "Host uncordoned."))
}

/// Drains a host: cordoned and marked draining; nothing on it is destroyed.
#[utoipa::path(post, path = "/dashboard/hosts/{id}/drain", tag = "dashboard",
    params(("id" = HostId, Path)),
    request_body(content = String, description = "`csrf=<token>&back=<page>`", content_type = "application/x-www-form-urlencoded"),
    responses((status = 303, description = "Back to the page, with the outcome")))]
pub(super) async fn drain(
    State(state): State<AppState>,
    operator: Operator,
    PathId(id): PathId<HostId>,
    Form(form): Form<ActionForm>,
) -> Outcome {
    operator.check_csrf(&form.csrf)?;
    let (admin, key, body) = admin_args(&operator);
    let result = admin::drain(State(state), admin, PathId(id), key, body).await;
    Ok(done(
        &form,
        result,
        "Host draining: cordoned; what runs on it stays until you act.",
    ))
}
