//! Every class of bad input gets its 4xx in the envelope and changes nothing in Postgres or
//! Redis: each case is sent, then `db_snapshot()` is compared with the one taken before.

mod admin_hosts;
mod capsules;
mod operator;

use axum::body::Body;
use axum::http::{Method, StatusCode};

use crate::common::TestApp;

/// One bad request and the error code it must get (the status follows from the code).
pub struct Case {
    method: Method,
    path: String,
    key: Option<String>,
    headers: Vec<(&'static str, String)>,
    body: String,
    code: &'static str,
}

pub fn bad(
    method: Method,
    path: impl Into<String>,
    key: Option<&str>,
    body: impl Into<String>,
    code: &'static str,
) -> Case {
    Case {
        method,
        path: path.into(),
        key: key.map(str::to_owned),
        headers: vec![],
        body: body.into(),
        code,
    }
}

impl Case {
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

fn status_of(code: &str) -> StatusCode {
    match code {
        "invalid_json" | "invalid_request" | "invalid_id" | "unknown_template" | "invalid_name" => {
            StatusCode::BAD_REQUEST
        }
        "unauthorized" => StatusCode::UNAUTHORIZED,
        "forbidden" => StatusCode::FORBIDDEN,
        "not_found" => StatusCode::NOT_FOUND,
        "method_not_allowed" => StatusCode::METHOD_NOT_ALLOWED,
        "invalid_state" | "operation_in_progress" | "name_taken" => StatusCode::CONFLICT,
        "payload_too_large" => StatusCode::PAYLOAD_TOO_LARGE,
        "idempotency_key_reused" => StatusCode::UNPROCESSABLE_ENTITY,
        other => panic!("no status for {other}"),
    }
}

pub async fn run(app: &TestApp, cases: Vec<Case>) {
    let before = app.db_snapshot().await;
    for c in cases {
        let what = format!(
            "{} {} {}",
            c.method,
            c.path,
            c.body.chars().take(80).collect::<String>()
        );
        let headers: Vec<(&str, &str)> = c.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = app
            .request(
                c.method,
                &c.path,
                c.key.as_deref(),
                &headers,
                Body::from(c.body),
            )
            .await;
        assert_eq!(r.status, status_of(c.code), "{what}: {r:#?}");
        assert_eq!(r.code(), c.code, "{what}: {r:#?}");
        let message = r.body["error"]["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{what}: no message");
        assert_eq!(app.db_snapshot().await, before, "{what} changed something");
    }
}
