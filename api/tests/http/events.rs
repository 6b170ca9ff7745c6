//! `GET /v1/events`: Server-Sent Events from the durable events table, resumable with
//! `Last-Event-ID`, filtered by capsule and by team.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use crate::common::{ADMIN_KEY, TestApp};

/// One message of the stream: its `id:` (the position) and its data.
#[derive(Debug)]
struct Message {
    id: String,
    data: Value,
}

/// Opens the stream: when this returns, the server has fixed where the stream starts.
async fn open(app: &TestApp, path: &str, key: &str, last_event_id: Option<&str>) -> Body {
    let mut request = Request::get(path).header("authorization", format!("Bearer {key}"));
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    let response = app
        .router
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    response.into_body()
}

/// Reads `n` messages off an open stream (panics after 10 s).
async fn take(body: Body, n: usize) -> Vec<Message> {
    take_more(body, n).await.0
}

/// Reads at least `n` messages (all that the frames read so far hold) and hands the stream
/// back.
async fn take_more(mut body: Body, n: usize) -> (Vec<Message>, Body) {
    let mut text = String::new();
    let mut messages = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while messages.len() < n {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {n} events arrived: {messages:?}",
                    messages.len()
                )
            })
            .expect("stream open")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(name).map(str::to_owned))
            };
            if let (Some(id), Some(data)) = (field("id: "), field("data: ")) {
                messages.push(Message {
                    id,
                    data: serde_json::from_str(&data).unwrap(),
                });
            }
        }
    }
    assert!(
        text.trim().is_empty(),
        "a frame ended inside a message: {text:?}"
    );
    (messages, body)
}

async fn read(
    app: &TestApp,
    path: &str,
    key: &str,
    last_event_id: Option<&str>,
    n: usize,
) -> Vec<Message> {
    take(open(app, path, key, last_event_id).await, n).await
}

#[tokio::test]
async fn events_stream_resumes_and_filters() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let (_, other) = app.team("other").await;
    let first = app.create_capsule(&key).await;
    app.create_capsule(&other).await;
    let second = app.create_capsule(&key).await;

    // From the beginning: this team's two capsule events, in order, nobody else's.
    let all = read(&app, "/v1/events?after=0.0", &key, None, 2).await;
    let capsules: Vec<&Value> = all.iter().map(|m| &m.data["capsule_id"]).collect();
    assert_eq!(
        capsules,
        [&first["capsule"]["id"], &second["capsule"]["id"]]
    );
    assert!(all[0].data["id"].as_i64() < all[1].data["id"].as_i64());

    // Reconnecting after the first resumes with the second.
    let resumed = read(&app, "/v1/events", &key, Some(&all[0].id), 1).await;
    assert_eq!(resumed[0].data, all[1].data);

    // A platform admin sees every team; a capsule filter narrows to one capsule.
    let everything = read(&app, "/v1/events?after=0.0", ADMIN_KEY, None, 3).await;
    assert_eq!(everything.len(), 3);
    let id = second["capsule"]["id"].as_str().unwrap();
    let one = read(
        &app,
        &format!("/v1/events?after=0.0&capsule_id={id}"),
        &key,
        None,
        1,
    )
    .await;
    assert_eq!(one[0].data["capsule_id"], id);
}

#[tokio::test]
async fn a_new_stream_starts_with_what_happens_next() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    app.create_capsule(&key).await;
    let stream = open(&app, "/v1/events", &key, None).await;
    let later = app.create_capsule(&key).await;
    // The start is conservative (an event whose transaction overlapped another one still
    // running when the stream opened may come too), never late: the new event arrives.
    let mut stream = stream;
    let mut seen = Vec::new();
    while !seen.contains(&later["capsule"]["id"]) {
        assert!(seen.len() < 2, "{seen:?}");
        let (messages, rest) = take_more(stream, 1).await;
        seen.extend(messages.into_iter().map(|m| m.data["capsule_id"].clone()));
        stream = rest;
    }
}

#[tokio::test]
async fn bad_positions_are_rejected() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    for path in [
        "/v1/events?after=12",
        "/v1/events?after=a.b",
        "/v1/events?capsule_id=cap_1",
        "/v1/events?since=1",
    ] {
        let r = app.get(path, &key).await;
        assert!(r.status == StatusCode::BAD_REQUEST, "{path}: {:?}", r.body);
    }
    app.get("/v1/events", "hk_nope")
        .await
        .assert_status(StatusCode::UNAUTHORIZED);
}
