//! The dashboard's session and its refusals, over the router: pages need a session, only an
//! admin key gets one, the cookie is HttpOnly and SameSite=Strict, an action without the
//! session's CSRF token changes nothing, and logging out ends the session.

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use tower::ServiceExt;

use crate::common::{ADMIN_KEY, TestApp};

struct Page {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

async fn send(app: &TestApp, method: Method, path: &str, cookie: Option<&str>, form: &str) -> Page {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    let response = app
        .router
        .clone()
        .oneshot(request.body(Body::from(form.to_owned())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    Page {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

async fn sessions(app: &TestApp) -> i64 {
    sqlx::query_scalar("select count(*) from dashboard_sessions")
        .fetch_one(&app.env.pool)
        .await
        .unwrap()
}

/// Logs in with the admin key; returns the `Cookie` header value.
async fn log_in(app: &TestApp) -> String {
    let page = send(
        app,
        Method::POST,
        "/dashboard/login",
        None,
        &format!("key={ADMIN_KEY}"),
    )
    .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    assert_eq!(page.headers[header::LOCATION], "/dashboard");
    let set = page.headers[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/dashboard"] {
        assert!(set.contains(attribute), "{set}");
    }
    set.split(';').next().unwrap().to_owned()
}

fn csrf_of(body: &str) -> String {
    let start = body
        .find("data-csrf=\"")
        .expect("the page carries the CSRF token")
        + 11;
    body[start..start + 32].to_owned()
}

#[tokio::test]
async fn pages_need_a_session_that_only_an_admin_key_opens() {
    let app = TestApp::new().await;
    let page = send(&app, Method::GET, "/dashboard/operations", None, "").await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(page.headers[header::LOCATION], "/dashboard/login");

    let (_, team_key) = app.team("acme").await;
    for form in [
        format!("key={team_key}"),
        "key=hk_nope".into(),
        "".into(),
        "other=1".into(),
    ] {
        let page = send(&app, Method::POST, "/dashboard/login", None, &form).await;
        assert_eq!(page.status, StatusCode::UNAUTHORIZED, "{form}");
        assert!(page.headers.get(header::SET_COOKIE).is_none());
        assert!(page.body.contains("role=\"alert\""), "{}", page.body);
    }
    assert_eq!(sessions(&app).await, 0, "a refused login stores nothing");

    let cookie = log_in(&app).await;
    let token = cookie.split_once('=').unwrap().1;
    let stored: Vec<u8> = sqlx::query_scalar("select token_hash from dashboard_sessions")
        .fetch_one(&app.env.pool)
        .await
        .unwrap();
    assert_ne!(
        stored,
        token.as_bytes(),
        "only a hash of the token is stored"
    );
    let page = send(
        &app,
        Method::GET,
        "/dashboard/operations",
        Some(&cookie),
        "",
    )
    .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("<h1>Operations</h1>"));

    // A filter that is not a status is an error, not an empty page.
    let page = send(
        &app,
        Method::GET,
        "/dashboard?status=bogus",
        Some(&cookie),
        "",
    )
    .await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST, "{}", page.body);
    assert!(page.body.contains("status"), "{}", page.body);

    // Logging out (with the token) ends the session: the cookie opens nothing any more.
    let csrf = csrf_of(&page_body(&app, &cookie).await);
    let page = send(
        &app,
        Method::POST,
        "/dashboard/logout",
        Some(&cookie),
        &format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(sessions(&app).await, 0);
    let page = send(&app, Method::GET, "/dashboard", Some(&cookie), "").await;
    assert_eq!(page.headers[header::LOCATION], "/dashboard/login");
}

async fn page_body(app: &TestApp, cookie: &str) -> String {
    send(app, Method::GET, "/dashboard/hosts", Some(cookie), "")
        .await
        .body
}

#[tokio::test]
async fn an_action_without_the_sessions_csrf_token_changes_nothing() {
    let app = TestApp::new().await;
    let (host, _) = app.register_host("host-1").await;
    let cookie = log_in(&app).await;
    let path = format!("/dashboard/hosts/{host}/cordon");
    let before = app.db_snapshot().await;
    for form in [
        "csrf=0123456789abcdef0123456789abcdef",
        "csrf=",
        "back=/dashboard",
    ] {
        let page = send(&app, Method::POST, &path, Some(&cookie), form).await;
        assert!(page.status.is_client_error(), "{form}: {}", page.status);
    }
    // Without a session at all: to the login page.
    let page = send(&app, Method::POST, &path, None, "csrf=x").await;
    assert_eq!(page.headers[header::LOCATION], "/dashboard/login");
    assert_eq!(
        app.db_snapshot().await,
        before,
        "refused actions changed something"
    );

    // With the token: cordoned, audited, and back to the page with the outcome.
    let csrf = csrf_of(&page_body(&app, &cookie).await);
    let form = format!("csrf={csrf}&back=%2Fdashboard%2Fhosts");
    let page = send(&app, Method::POST, &path, Some(&cookie), &form).await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    let location = page.headers[header::LOCATION].to_str().unwrap();
    assert!(
        location.starts_with("/dashboard/hosts?notice=Host%20cordoned"),
        "{location}"
    );
    let after = app.db_snapshot().await;
    assert_eq!(after["hosts.cordoned"], 1);
    assert_eq!(after["audit_log"], before["audit_log"] + 1);
    // A `back` off the dashboard is not followed.
    let form = format!("csrf={csrf}&back=https%3A%2F%2Fevil.example");
    let page = send(
        &app,
        Method::POST,
        &format!("/dashboard/hosts/{host}/uncordon"),
        Some(&cookie),
        &form,
    )
    .await;
    assert!(
        page.headers[header::LOCATION]
            .to_str()
            .unwrap()
            .starts_with("/dashboard?notice=")
    );
    // Nor one that could not be a header (a control character).
    let form = format!("csrf={csrf}&back=%2Fdashboard%0D%0ASet-Cookie%3A%20x");
    let path = format!("/dashboard/hosts/{host}/cordon");
    let page = send(&app, Method::POST, &path, Some(&cookie), &form).await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    let location = page.headers[header::LOCATION].to_str().unwrap();
    assert!(location.starts_with("/dashboard?notice="), "{location}");
}

#[tokio::test]
async fn a_refused_page_is_html_with_the_code_and_the_reason() {
    let app = TestApp::new().await;
    let cookie = log_in(&app).await;
    let unknown = "/dashboard/capsules/cap_0190f5a0c0de7000800000000000000a";
    for (path, status, code) in [
        (
            "/dashboard/operations?id=op_nope",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (unknown, StatusCode::NOT_FOUND, "not_found"),
    ] {
        let page = send(&app, Method::GET, path, Some(&cookie), "").await;
        assert_eq!(page.status, status, "{path}: {}", page.body);
        assert!(
            page.headers[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/html"),
            "{path}"
        );
        assert!(page.body.contains(code), "{path}: {}", page.body);
    }
}

/// The figures of one kind's row on the queues page, in column order.
fn queue_row(body: &str, kind: &str) -> Vec<String> {
    let start = body
        .find(&format!("<tr data-kind=\"{kind}\">"))
        .expect("a row per kind");
    let row = &body[start..start + body[start..].find("</tr>").unwrap()];
    row.split("<td class=\"num\">")
        .skip(1)
        .map(|cell| {
            // The text without tags (the dead count is a link).
            let mut inside = false;
            cell[..cell.find("</td>").unwrap()]
                .chars()
                .filter(|c| {
                    inside = (inside || *c == '<') && *c != '>';
                    !inside && *c != '>'
                })
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn queues_count_a_job_not_yet_pushed_as_scheduled() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    app.create_capsule(&key).await;
    let cookie = log_in(&app).await;
    let figures = |update: &'static str| {
        let (app, cookie) = (&app, &cookie);
        async move {
            sqlx::query(update).execute(&app.env.pool).await.unwrap();
            let page = send(app, Method::GET, "/dashboard/queues", Some(cookie), "").await;
            assert_eq!(page.status, StatusCode::OK, "{}", page.body);
            queue_row(&page.body, "create")
        }
    };
    // Columns: queued, in flight, retrying, scheduled, dead, …
    let pushed = figures("update operations set pushed_at = now()").await;
    assert_eq!(pushed[..5], ["1", "0", "0", "0", "0"], "{pushed:?}");
    let unpushed = figures("update operations set pushed_at = null").await;
    assert_eq!(unpushed[..5], ["0", "0", "0", "1", "0"], "{unpushed:?}");
}
