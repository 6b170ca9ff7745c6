//! The test harness: a fresh database and Redis prefix per test (`hangar_jobs::testing`),
//! the real router driven in-process with `tower::ServiceExt::oneshot`, typed helpers, and
//! `db_snapshot` to prove that rejected requests change nothing.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use hangar_api::{ApiConfig, AppState};
use hangar_jobs::store::operations::{self, Outcome};
use hangar_jobs::store::{Capsule, capsules};
use hangar_jobs::testing::TestEnv;
use hangar_jobs::{CapsuleId, CapsuleStatus, HostId, OperationId, OperationKind, OperationStatus};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

pub const ADMIN_KEY: &str = "hk_admin000_00000000000000000000000000000000";
pub const JOIN_TOKEN: &str = "test-join-token";
pub const TABLES: &[&str] = &[
    "teams",
    "api_keys",
    "hosts",
    "templates",
    "capsules",
    "operations",
    "idempotency_keys",
    "events",
    "host_events",
    "audit_log",
];

pub struct TestApp {
    pub env: TestEnv,
    pub state: AppState,
    pub router: Router,
}

/// A response, its body parsed as JSON (`Value::Null` when empty).
#[derive(Debug)]
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl TestResponse {
    /// The envelope's error code (panics with the response when there is none).
    pub fn code(&self) -> &str {
        self.body["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error envelope in {self:?}"))
    }

    #[track_caller]
    pub fn assert_status(&self, status: StatusCode) -> &Self {
        assert_eq!(self.status, status, "unexpected response: {self:#?}");
        self
    }

    #[track_caller]
    pub fn assert_error(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "unexpected response: {self:#?}");
        assert_eq!(self.code(), code, "unexpected response: {self:#?}");
        assert!(self.body["error"]["message"].is_string());
    }
}

/// Counts of every table and the length of every job stream (plus a few column sums that
/// change on updates), to compare before and after a request.
pub type Snapshot = BTreeMap<String, i64>;

impl TestApp {
    pub async fn new() -> Self {
        Self::with_config(|_| {}).await
    }

    pub async fn with_config(tweak: impl FnOnce(&mut ApiConfig)) -> Self {
        let env = TestEnv::new().await;
        let mut config = ApiConfig::new("127.0.0.1:0".parse().unwrap(), JOIN_TOKEN);
        tweak(&mut config);
        hangar_api::ensure_admin_key(&env.pool, ADMIN_KEY)
            .await
            .expect("admin key");
        let state = AppState::new(env.pool.clone(), env.queue.clone(), config)
            .await
            .expect("app state");
        let router = hangar_api::router(state.clone());
        TestApp { env, state, router }
    }

    pub async fn send(&self, request: Request<Body>) -> TestResponse {
        let response = self
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!(
                    "{status}: body is not JSON ({e}): {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        TestResponse {
            status,
            headers,
            body,
        }
    }

    /// A request with an optional bearer key, extra headers and a raw body.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
        body: impl Into<Body>,
    ) -> TestResponse {
        let mut builder = Request::builder().method(method).uri(path);
        if let Some(key) = key {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        builder = builder.header(header::CONTENT_TYPE, "application/json");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        self.send(builder.body(body.into()).unwrap()).await
    }

    pub async fn get(&self, path: &str, key: &str) -> TestResponse {
        self.request(Method::GET, path, Some(key), &[], Body::empty())
            .await
    }

    pub async fn delete(&self, path: &str, key: &str) -> TestResponse {
        self.request(Method::DELETE, path, Some(key), &[], Body::empty())
            .await
    }

    pub async fn post_json(&self, path: &str, key: &str, body: Value) -> TestResponse {
        self.request(Method::POST, path, Some(key), &[], body.to_string())
            .await
    }

    pub async fn post_raw(&self, path: &str, key: Option<&str>, body: &str) -> TestResponse {
        self.request(Method::POST, path, key, &[], body.to_owned())
            .await
    }

    pub async fn post_idempotent(
        &self,
        path: &str,
        key: &str,
        idem: &str,
        body: Value,
    ) -> TestResponse {
        self.request(
            Method::POST,
            path,
            Some(key),
            &[("idempotency-key", idem)],
            body.to_string(),
        )
        .await
    }

    /// A team created through the admin API; returns its id.
    pub async fn create_team(&self, name: &str) -> String {
        let r = self
            .post_json("/v1/admin/teams", ADMIN_KEY, json!({ "name": name }))
            .await;
        r.assert_status(StatusCode::CREATED);
        r.body["id"].as_str().unwrap().to_owned()
    }

    /// A fresh key of `team_id` (minted through the admin API); returns the secret.
    pub async fn mint_key(&self, team_id: &str) -> String {
        let r = self
            .post_json(
                &format!("/v1/admin/teams/{team_id}/keys"),
                ADMIN_KEY,
                json!({ "name": "test" }),
            )
            .await;
        r.assert_status(StatusCode::CREATED);
        r.body["key"].as_str().unwrap().to_owned()
    }

    /// A new team and a key of it: `(team_id, key)`.
    pub async fn team(&self, name: &str) -> (String, String) {
        let team = self.create_team(name).await;
        let key = self.mint_key(&team).await;
        (team, key)
    }

    /// Creates a capsule with the defaults; returns the 202 body `{operation, capsule}`.
    pub async fn create_capsule(&self, key: &str) -> Value {
        let r = self.post_json("/v1/capsules", key, json!({})).await;
        r.assert_status(StatusCode::ACCEPTED);
        r.body
    }

    /// Does what a worker would: the create succeeds and the capsule is `running`.
    pub async fn make_running(&self, created: &Value) -> CapsuleId {
        let id: CapsuleId = created["capsule"]["id"].as_str().unwrap().parse().unwrap();
        let op: OperationId = created["operation"]["id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        self.finish(op, OperationStatus::Succeeded).await;
        self.transition(id, CapsuleStatus::Running).await;
        id
    }

    pub async fn capsule(&self, id: CapsuleId) -> Capsule {
        let mut conn = self.env.pool.acquire().await.unwrap();
        capsules::get(&mut conn, None, id).await.unwrap().unwrap()
    }

    /// Moves a capsule from where it is to `to` (a conditional transition, as a worker).
    pub async fn transition(&self, id: CapsuleId, to: CapsuleStatus) -> Capsule {
        let c = self.capsule(id).await;
        let mut conn = self.env.pool.acquire().await.unwrap();
        capsules::transition(&mut conn, id, c.status, c.generation, to, None)
            .await
            .unwrap()
            .expect("transition applied")
    }

    pub async fn finish(&self, op: OperationId, status: OperationStatus) {
        let mut conn = self.env.pool.acquire().await.unwrap();
        let done = operations::finish(
            &mut conn,
            op,
            None,
            Outcome {
                status,
                error_code: None,
                error: None,
                result: None,
            },
        )
        .await
        .unwrap();
        assert!(done, "operation {op} was already finished");
    }

    pub async fn place_on(&self, capsule: CapsuleId, host: HostId) {
        let mut conn = self.env.pool.acquire().await.unwrap();
        assert!(
            capsules::assign_host(&mut conn, capsule, host)
                .await
                .unwrap()
        );
    }

    /// Registers a host through the API: `(host_id, host_token)`.
    pub async fn register_host(&self, name: &str) -> (String, String) {
        let r = self
            .post_json(
                "/v1/hosts/register",
                "unused",
                json!({
                    "join_token": JOIN_TOKEN, "name": name, "address": "127.0.0.1:7070",
                    "driver": "sim", "agent_token": "agent-secret", "vcpus": 8, "memory_mb": 8192,
                }),
            )
            .await;
        r.assert_status(StatusCode::OK);
        (
            r.body["host_id"].as_str().unwrap().to_owned(),
            r.body["host_token"].as_str().unwrap().to_owned(),
        )
    }

    pub async fn stream_len(&self, kind: OperationKind) -> u64 {
        self.env.queue.depth(kind).await.unwrap()
    }

    pub async fn db_snapshot(&self) -> Snapshot {
        let mut conn = self.env.pool.acquire().await.unwrap();
        let mut snapshot = Snapshot::new();
        let extra = [
            (
                "capsules.generation_sum",
                "select coalesce(sum(generation), 0)::int8 from capsules",
            ),
            (
                "capsules.expires_at_sum",
                "select coalesce(sum(extract(epoch from expires_at)), 0)::int8 from capsules",
            ),
            (
                "hosts.cordoned",
                "select count(*) from hosts where cordoned",
            ),
            (
                "hosts.draining",
                "select count(*) from hosts where drain_requested_at is not null",
            ),
            (
                "operations.status",
                "select count(*) from operations where status = 'queued'",
            ),
            (
                "operations.pushed",
                "select count(*) from operations where pushed_at is not null",
            ),
        ];
        let counts = TABLES
            .iter()
            .map(|t| (t.to_string(), format!("select count(*) from {t}")))
            .chain(extra.iter().map(|(k, q)| (k.to_string(), q.to_string())));
        for (name, query) in counts {
            let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(query))
                .fetch_one(&mut *conn)
                .await
                .unwrap();
            snapshot.insert(name, n);
        }
        for kind in OperationKind::ALL {
            snapshot.insert(format!("xlen:{kind}"), self.stream_len(*kind).await as i64);
        }
        snapshot
    }
}

/// Waits (polling a cheap in-process counter) until `n` `?wait=` requests are parked.
pub async fn until_parked(state: &AppState, n: usize) {
    let start = Instant::now();
    while state.parked_waiters() < n {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no request parked"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
