//! The operator dashboard at `/dashboard`: server-rendered pages over the same store and
//! intents as the API, behind an admin-key login.
//!
//! - **Sessions**: logging in with an admin key stores a session (only the hash of its
//!   token) and sets an `HttpOnly; SameSite=Strict` cookie scoped to `/dashboard`; the
//!   session dies with its expiry, a logout, or the key's revocation.
//! - **Actions** (retry, cancel, cordon, uncordon, drain) are POST forms carrying the
//!   session's CSRF token; they call the admin API's own handlers, so they are the same
//!   conditional, audited operations.
//! - **Live**: a small script listens to `/dashboard/live` (the event stream) and reloads
//!   the page's content when something happens. Everything is served from here: no CDN.

mod actions;
mod page;
mod views;

use axum::Form;
use axum::extract::rejection::FormRejection;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use hangar_jobs::keys;
use hangar_jobs::store::{Principal, dashboard, tenancy};
use serde::Deserialize;
use subtle::ConstantTimeEq;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::error::ApiError;

const COOKIE: &str = "hangar_session";
/// Sessions last a working day.
const SESSION_SECS: f64 = 12.0 * 3600.0;

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(login_page, login))
        .routes(routes!(logout))
        .routes(routes!(views::capsules))
        .routes(routes!(views::capsule))
        .routes(routes!(views::operations))
        .routes(routes!(views::operation))
        .routes(routes!(views::queues))
        .routes(routes!(views::hosts))
        .routes(routes!(views::live))
        .routes(routes!(actions::retry))
        .routes(routes!(actions::cancel))
        .routes(routes!(actions::cordon))
        .routes(routes!(actions::uncordon))
        .routes(routes!(actions::drain))
}

/// The admin behind a dashboard session. Without a valid session, pages redirect to the
/// login page.
pub(crate) struct Operator {
    pub principal: Principal,
    pub csrf: String,
}

impl FromRequestParts<AppState> for Operator {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let to_login = || Redirect::to("/dashboard/login").into_response();
        let Some(token) = session_token(&parts.headers) else {
            return Err(to_login());
        };
        let mut conn = state
            .pool
            .acquire()
            .await
            .map_err(|e| ApiError::from(e).into_response())?;
        match dashboard::session(&mut conn, &keys::hash_secret(token)).await {
            Ok(Some((principal, csrf))) => Ok(Operator { principal, csrf }),
            Ok(None) => Err(to_login()),
            Err(error) => Err(ApiError::from(error).into_response()),
        }
    }
}

impl Operator {
    /// Whether a submitted form carries this session's CSRF token.
    fn check_csrf(&self, submitted: &str) -> Result<(), CsrfRefused> {
        if bool::from(self.csrf.as_bytes().ct_eq(submitted.as_bytes())) {
            Ok(())
        } else {
            Err(CsrfRefused)
        }
    }
}

/// A form not sent from the session's own pages: refused, nothing done.
pub(crate) struct CsrfRefused;

impl IntoResponse for CsrfRefused {
    fn into_response(self) -> Response {
        let page = page::message(
            "Request refused",
            "The form was not sent from this session (CSRF token missing or wrong). \
             Reload the page and try again.",
        );
        (StatusCode::FORBIDDEN, page).into_response()
    }
}

fn session_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
        .filter(|v| !v.is_empty() && v.len() <= 128)
}

fn cookie(value: &str, max_age_secs: u64) -> HeaderValue {
    let cookie = format!(
        "{COOKIE}={value}; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age={max_age_secs}"
    );
    HeaderValue::from_str(&cookie).expect("cookie is ASCII")
}

/// The login form.
#[utoipa::path(
    get,
    path = "/dashboard/login",
    tag = "dashboard",
    responses((status = 200, description = "The login form", content_type = "text/html", body = String))
)]
async fn login_page() -> Response {
    page::login(None).into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    key: String,
}

/// Logs in with an admin key: sets the session cookie and goes to the dashboard.
#[utoipa::path(
    post,
    path = "/dashboard/login",
    tag = "dashboard",
    request_body(content = String, description = "`key=<admin key>`", content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 303, description = "Logged in: the session cookie is set"),
        (status = 401, description = "Not an admin key: the form again, with the reason", content_type = "text/html", body = String),
    )
)]
async fn login(
    State(state): State<AppState>,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    let refuse =
        |reason: &str| (StatusCode::UNAUTHORIZED, page::login(Some(reason))).into_response();
    let Ok(Form(form)) = form else {
        return refuse("Enter an admin key.");
    };
    let key = form.key.trim();
    if key.is_empty() || key.len() > 256 {
        return refuse("Enter an admin key.");
    }
    match start_session(&state, key).await {
        Ok(Some(token)) => {
            let mut response = Redirect::to("/dashboard").into_response();
            let value = cookie(&token, SESSION_SECS as u64);
            response.headers_mut().insert(header::SET_COOKIE, value);
            response
        }
        Ok(None) => refuse("That key is not an admin key of the platform team, or it was revoked."),
        Err(error) => error.into_response(),
    }
}

/// A new session for `key` if it is a live admin key; its token for the cookie.
async fn start_session(state: &AppState, key: &str) -> Result<Option<String>, ApiError> {
    let mut tx = state.pool.begin().await?;
    let principal = tenancy::principal_by_key_hash(&mut tx, &keys::hash_secret(key)).await?;
    let Some(principal) = principal.filter(|p| p.is_admin && p.is_platform) else {
        return Ok(None);
    };
    let token = keys::random_hex(32);
    let csrf = keys::random_hex(16);
    let hash = keys::hash_secret(&token);
    dashboard::create_session(&mut tx, &hash, principal.key_id, &csrf, SESSION_SECS).await?;
    let detail = serde_json::json!({});
    crate::audit::accepted(
        &mut tx,
        Some(&principal),
        None,
        "dashboard.login",
        principal.key_id,
        detail,
    )
    .await?;
    tx.commit().await?;
    Ok(Some(token))
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

/// Ends the session.
#[utoipa::path(
    post,
    path = "/dashboard/logout",
    tag = "dashboard",
    request_body(content = String, description = "`csrf=<token>`", content_type = "application/x-www-form-urlencoded"),
    responses((status = 303, description = "Logged out: back to the login form"))
)]
async fn logout(
    State(state): State<AppState>,
    operator: Operator,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, Response> {
    operator
        .check_csrf(&form.csrf)
        .map_err(IntoResponse::into_response)?;
    if let Some(token) = session_token(&headers) {
        let ended = async {
            let mut conn = state.pool.acquire().await?;
            dashboard::end_session(&mut conn, &keys::hash_secret(token)).await?;
            Ok::<_, ApiError>(())
        };
        ended.await.map_err(IntoResponse::into_response)?;
    }
    let mut response = Redirect::to("/dashboard/login").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, cookie("", 0));
    Ok(response)
}
