//! The dashboard's actions. Each checks the session's CSRF token, then calls the admin API's
//! handler for the same action with the session's admin key as the actor, so it takes the
//! same conditional path and writes the same audit row. The outcome comes back as a notice
//! on the page the action was sent from.

use std::future::Future;

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
        // Printable ASCII only: anything else could not be a `Location` header.
        .filter(|b| b.bytes().all(|c| c.is_ascii_graphic()))
        .unwrap_or("/dashboard");
    let notice = match result {
        Ok(_) => success.to_owned(),
        Err(error) => format!("Refused ({}): {error}", error.code()),
    };
    let sep = if back.contains('?') { '&' } else { '?' };
    Redirect::to(&format!("{back}{sep}notice={}", encode(&notice))).into_response()
}

/// Checks the CSRF token, then runs the admin handler `call` as the session's admin, with no
/// body and no idempotency key; back to the page with `success(reply)` or the refusal.
async fn act<Fut>(
    operator: &Operator,
    form: ActionForm,
    call: impl FnOnce(Admin, IdempotencyKey, JsonBody<Empty>) -> Fut,
    success: impl FnOnce(&Reply) -> String,
) -> Outcome
where
    Fut: Future<Output = Result<Reply, ApiError>>,
{
    operator.check_csrf(&form.csrf)?;
    let body = JsonBody {
        value: Empty {},
        hash: Vec::new(),
    };
    let admin = Admin(operator.principal.clone());
    let result = call(admin, IdempotencyKey(None), body).await;
    let message = result.as_ref().map(success).unwrap_or_default();
    Ok(done(&form, result, &message))
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
    let call = |a, k, b| admin_operations::retry(State(state), a, PathId(id), k, b);
    act(&operator, form, call, |reply| {
        let id = reply.body["operation"]["id"].as_str().unwrap_or("?");
        format!("Retry accepted as operation {id}.")
    })
    .await
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
    let call = |a, k, b| admin_operations::cancel(State(state), a, PathId(id), k, b);
    act(&operator, form, call, |_| {
        format!("Operation {id} cancelled.")
    })
    .await
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
    let call = |a, k, b| admin::cordon(State(state), a, PathId(id), k, b);
    act(&operator, form, call, |_| {
        "Host cordoned: no new capsules are placed on it.".into()
    })
    .await
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
    let call = |a, k, b| admin::uncordon(State(state), a, PathId(id), k, b);
    act(&operator, form, call, |_| "Host uncordoned.".into()).await
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
    let call = |a, k, b| admin::drain(State(state), a, PathId(id), k, b);
    act(&operator, form, call, |_| {
        "Host draining: cordoned; what runs on it stays until you act.".into()
    })
    .await
}
