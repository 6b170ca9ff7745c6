//! Registration, heartbeats and event delivery against a fake control plane (axum) that
//! records every call.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::{TestAgent, config};
use hangar_proto::{CreateSandboxRequest, ListSandboxesRequest, SandboxState};
use serde_json::{Value, json};

const HOST_TOKEN: &str = "host-token-secret";

#[derive(Default)]
struct Fake {
    registrations: Mutex<Vec<Value>>,
    heartbeats: Mutex<Vec<Value>>,
    /// Every events POST: the status the fake answered, and the body.
    event_posts: Mutex<Vec<(u16, Value)>>,
    /// How many of the next heartbeats / event posts to refuse.
    reject_heartbeats: AtomicUsize,
    fail_events: AtomicUsize,
}

impl Fake {
    async fn start() -> (Arc<Self>, String) {
        let fake = Arc::new(Self::default());
        let app = axum::Router::new()
            .route("/v1/hosts/register", post(register))
            .route("/v1/hosts/{id}/heartbeat", post(heartbeat))
            .route("/v1/hosts/{id}/events", post(events))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (fake, url)
    }

    fn delivered(&self) -> Vec<Value> {
        let posts = self.event_posts.lock().unwrap();
        posts
            .iter()
            .filter(|(status, _)| *status == 200)
            .flat_map(|(_, body)| body["events"].as_array().unwrap().clone())
            .collect()
    }
}

/// Takes one from `counter` if it is positive.
fn take(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

fn authorized(headers: &HeaderMap, id: &str) -> bool {
    let expected = format!("Bearer {HOST_TOKEN}");
    id == "host_1"
        && headers
            .get("authorization")
            .is_some_and(|v| v == expected.as_str())
}

async fn register(State(fake): State<Arc<Fake>>, Json(body): Json<Value>) -> Json<Value> {
    fake.registrations.lock().unwrap().push(body);
    Json(json!({ "host_id": "host_1", "host_token": HOST_TOKEN }))
}

async fn heartbeat(
    State(fake): State<Arc<Fake>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> StatusCode {
    if !authorized(&headers, &id) || take(&fake.reject_heartbeats) {
        return StatusCode::UNAUTHORIZED;
    }
    fake.heartbeats.lock().unwrap().push(body);
    StatusCode::OK
}

async fn events(
    State(fake): State<Arc<Fake>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> StatusCode {
    if !authorized(&headers, &id) {
        return StatusCode::UNAUTHORIZED;
    }
    let status = if take(&fake.fail_events) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    fake.event_posts
        .lock()
        .unwrap()
        .push((status.as_u16(), body));
    status
}

/// Polls `condition` until it holds, failing the test after 10 s.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn create(id: &str) -> CreateSandboxRequest {
    CreateSandboxRequest {
        sandbox_id: id.into(),
        vcpus: 2,
        memory_mb: 512,
        image: "base".into(),
        snapshot_id: String::new(),
        generation: 1,
    }
}

#[tokio::test]
async fn registers_and_heartbeats() {
    let (fake, url) = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(config(dir.path(), &url, &["--vcpus", "8"])).await;
    let mut c = agent.client().await;
    c.create_sandbox(agent.authed(create("cap_a")))
        .await
        .unwrap();

    eventually("a heartbeat that counts the sandbox", || {
        fake.heartbeats
            .lock()
            .unwrap()
            .iter()
            .any(|h| h["sandboxes"] == 1)
    })
    .await;
    let registration = fake.registrations.lock().unwrap()[0].clone();
    let port = agent.addr.port();
    assert_eq!(
        registration,
        json!({
            "join_token": "join-secret",
            "name": format!("host-{port}"),
            "address": format!("http://127.0.0.1:{port}"),
            "driver": "sim",
            "agent_token": agent.token,
            "vcpus": 8,
            "memory_mb": 262_144,
        })
    );
    let heartbeat = fake.heartbeats.lock().unwrap().last().unwrap().clone();
    assert_eq!(
        heartbeat,
        json!({
            "vcpus_total": 8,
            "memory_mb_total": 262_144,
            "vcpus_used": 2,
            "memory_mb_used": 512,
            "sandboxes": 1,
        })
    );

    let identity: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("identity.json")).unwrap()).unwrap();
    assert_eq!(identity["host_id"], "host_1");
    assert_eq!(identity["agent_token"], agent.token.as_str());
    agent.stop().await;
}

#[tokio::test]
async fn a_rejected_heartbeat_registers_again() {
    let (fake, url) = Fake::start().await;
    fake.reject_heartbeats.store(1, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(config(dir.path(), &url, &[])).await;
    eventually("a second registration and a heartbeat", || {
        fake.registrations.lock().unwrap().len() >= 2 && !fake.heartbeats.lock().unwrap().is_empty()
    })
    .await;
    agent.stop().await;
}

#[tokio::test]
async fn a_crash_event_is_delivered_after_a_503() {
    let (fake, url) = Fake::start().await;
    fake.fail_events.store(1, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    // A rate this high crashes a running VM on the sim's next tick.
    let agent = TestAgent::start(config(dir.path(), &url, &["--sim-crash-rate", "1e9"])).await;
    let mut c = agent.client().await;
    c.create_sandbox(agent.authed(create("cap_a")))
        .await
        .unwrap();

    eventually("the crash event", || !fake.delivered().is_empty()).await;
    let delivered = fake.delivered();
    let event = &delivered[0];
    assert_eq!(
        (event["sandbox_id"].as_str(), event["kind"].as_str()),
        (Some("cap_a"), Some("crashed"))
    );
    assert!(event["at_ms"].as_i64().unwrap() > 0);
    let first_attempt = fake.event_posts.lock().unwrap()[0].clone();
    assert_eq!(first_attempt.0, 503);
    assert_eq!(
        first_attempt.1["events"][0]["event_id"], event["event_id"],
        "one id per event"
    );

    let listed = c
        .list_sandboxes(agent.authed(ListSandboxesRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.sandboxes[0].state(), SandboxState::Crashed);
    agent.stop().await;
}

#[tokio::test]
async fn undelivered_events_survive_a_restart() {
    let (fake, url) = Fake::start().await;
    fake.fail_events.store(usize::MAX, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(config(dir.path(), &url, &["--sim-crash-rate", "1e9"])).await;
    let mut c = agent.client().await;
    c.create_sandbox(agent.authed(create("cap_a")))
        .await
        .unwrap();
    eventually("a refused delivery", || {
        !fake.event_posts.lock().unwrap().is_empty()
    })
    .await;
    agent.stop().await;
    let refused_id = fake.event_posts.lock().unwrap()[0].1["events"][0]["event_id"].clone();

    fake.fail_events.store(0, Ordering::SeqCst);
    let agent = TestAgent::start(config(dir.path(), &url, &[])).await;
    eventually("the event from before the restart", || {
        !fake.delivered().is_empty()
    })
    .await;
    let delivered = fake.delivered();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0]["event_id"], refused_id);
    agent.stop().await;
}
