//! One trace per operation across processes: a real api, worker and agent export their spans
//! over OTLP to a receiver this test runs, and the spans of one create (and of one pause
//! that is retried while its agent is down) must form one trace with correct parent links;
//! the creates of one batch are each their own trace, with one span per attempt.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Cluster;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use serde_json::json;
use tonic::{Request, Response, Status};

/// A span as received, with the name of the service that sent it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attributes: HashMap<String, String>,
}

/// An OTLP/gRPC trace receiver that keeps every span it is sent.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .map(|r| attributes(&r.attributes))
                .and_then(|mut a| a.remove("service.name"))
                .unwrap_or_default();
            for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(Received {
                    service: service.clone(),
                    name: span.name,
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent_span_id: span.parent_span_id,
                    attributes: attributes(&span.attributes),
                });
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .filter_map(|kv| {
            let value = match kv.value.as_ref()?.value.as_ref()? {
                AnyValue::StringValue(s) => s.clone(),
                AnyValue::IntValue(i) => i.to_string(),
                AnyValue::BoolValue(b) => b.to_string(),
                AnyValue::DoubleValue(d) => d.to_string(),
                _ => return None,
            };
            Some((kv.key.clone(), value))
        })
        .collect()
}

impl Receiver {
    /// Serves OTLP on a free loopback port; returns its endpoint.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        endpoint
    }

    fn spans(&self) -> Vec<Received> {
        self.0.lock().unwrap().clone()
    }

    /// Waits until `found` finds something in the spans received so far (exports are
    /// batched and each process exports on its own schedule).
    async fn wait_until<T>(&self, what: &str, found: impl Fn(&[Received]) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(hit) = found(&self.spans()) {
                return hit;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; got {:#?}",
                self.spans()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for a span matching `found`.
    async fn wait_for(&self, what: &str, found: impl Fn(&Received) -> bool) -> Received {
        self.wait_until(what, |all| all.iter().find(|s| found(s)).cloned())
            .await
    }
}

/// The HTTP request span of the API for `method path`.
fn is_request(span: &Received, method: &str, path: &str) -> bool {
    span.service == "hangar-api"
        && span.name == "http"
        && span.attributes.get("method").map(String::as_str) == Some(method)
        && span.attributes.get("path").map(String::as_str) == Some(path)
}

/// Whether `span`'s chain of parents in `all` reaches `ancestor`.
fn descends_from(all: &[Received], span: &Received, ancestor: &Received) -> bool {
    let mut current = span.clone();
    for _ in 0..32 {
        if current.parent_span_id == ancestor.span_id {
            return true;
        }
        match all.iter().find(|s| s.span_id == current.parent_span_id) {
            Some(parent) => current = parent.clone(),
            None => return false,
        }
    }
    false
}

/// Exports every 50 ms instead of every 5 s, so spans arrive while the test waits.
const FAST_EXPORT: (&str, &str) = ("OTEL_BSP_SCHEDULE_DELAY", "50");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_and_a_retried_pause_are_each_one_trace_across_api_worker_and_agent() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let otlp = ("HANGAR_OTLP_ENDPOINT", endpoint.as_str());
    let mut cluster =
        Cluster::start_with(&[otlp, FAST_EXPORT, ("HANGAR_MAX_ATTEMPTS", "1000")]).await;
    cluster.spawn_agent("host-1", &[otlp, FAST_EXPORT]).await;
    cluster.spawn_worker(
        "worker",
        &[otlp, FAST_EXPORT, ("HANGAR_RETRY_CAP_MS", "300")],
    );

    // A create: request → enqueue → job → gRPC call → the agent's work, one trace.
    let (op, capsule) = cluster.create_capsule("base").await;
    assert_eq!(cluster.wait_operation(&op).await["status"], "succeeded");
    let request = receiver
        .wait_for("the create request", |s| {
            is_request(s, "POST", "/v1/capsules")
        })
        .await;
    let in_trace = |service: &'static str, name: &'static str| {
        let trace = request.trace_id.clone();
        move |s: &Received| s.trace_id == trace && s.service == service && s.name == name
    };
    let enqueue = receiver
        .wait_for("enqueue", in_trace("hangar-api", "enqueue"))
        .await;
    let job = receiver
        .wait_for("the job", in_trace("hangar-worker", "job"))
        .await;
    let call = receiver
        .wait_for("the gRPC call", in_trace("hangar-worker", "grpc.client"))
        .await;
    let served = receiver
        .wait_for("the agent's server span", in_trace("hangar-agent", "grpc"))
        .await;
    let work = receiver
        .wait_for(
            "the agent's work",
            in_trace("hangar-agent", "create_sandbox"),
        )
        .await;
    let all = receiver.spans();
    assert!(descends_from(&all, &enqueue, &request));
    assert_eq!(enqueue.attributes["operation_id"], op);
    assert!(descends_from(&all, &job, &request), "{job:#?}");
    assert_eq!(job.attributes["operation_id"], op);
    assert_eq!(job.attributes["capsule_id"], capsule);
    assert_eq!(job.attributes["attempt"], "1");
    assert_eq!(call.parent_span_id, job.span_id);
    assert_eq!(served.parent_span_id, call.span_id, "context crossed gRPC");
    assert_eq!(work.parent_span_id, served.span_id);

    // A pause while the agent is down: every attempt is a new job span in the same trace.
    cluster.kill("host-1");
    let (pause, _) = cluster
        .accepted(&format!("/v1/capsules/{capsule}/pause"), json!({}))
        .await;
    let is_attempt =
        |s: &Received| s.name == "job" && s.attributes.get("operation_id") == Some(&pause);
    receiver
        .wait_for("a second pause attempt", |s| {
            is_attempt(s) && s.attributes.get("attempt").map(String::as_str) == Some("2")
        })
        .await;
    cluster.spawn_agent("host-1", &[otlp, FAST_EXPORT]).await;
    assert_eq!(cluster.wait_operation(&pause).await["status"], "succeeded");
    let path = format!("/v1/capsules/{capsule}/pause");
    let request = receiver
        .wait_for("the pause request", |s| is_request(s, "POST", &path))
        .await;
    // The attempt that reached the agent, and the agent's work under it.
    let (last, paused) = receiver
        .wait_until("the pause's agent work under its last attempt", |all| {
            let paused = all.iter().find(|s| s.name == "pause_sandbox")?;
            let last = all
                .iter()
                .find(|s| is_attempt(s) && descends_from(all, paused, s))?;
            Some((last.clone(), paused.clone()))
        })
        .await;
    let all = receiver.spans();
    let attempts: Vec<&Received> = all.iter().filter(|s| is_attempt(s)).collect();
    assert!(attempts.len() >= 3, "{attempts:#?}");
    for attempt in &attempts {
        assert_eq!(attempt.trace_id, request.trace_id, "{attempt:#?}");
        assert!(descends_from(&all, attempt, &request));
    }
    let mut numbers: Vec<u32> = attempts
        .iter()
        .map(|a| a.attributes["attempt"].parse().unwrap())
        .collect();
    numbers.sort_unstable();
    numbers.dedup();
    assert_eq!(numbers.len(), attempts.len(), "one span per attempt");
    assert_eq!(paused.trace_id, request.trace_id);
    assert_eq!(
        last.attributes["attempt"],
        numbers.last().unwrap().to_string()
    );
}

/// The attempt number of `span` if it is a `job` span of operation `op`.
fn attempt_of(span: &Received, op: &str) -> Option<u32> {
    if span.name != "job" || span.attributes.get("operation_id").map(String::as_str) != Some(op) {
        return None;
    }
    span.attributes.get("attempt")?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_create_of_a_batch_is_its_own_trace_with_one_span_per_attempt() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let otlp = ("HANGAR_OTLP_ENDPOINT", endpoint.as_str());
    let mut cluster =
        Cluster::start_with(&[otlp, FAST_EXPORT, ("HANGAR_MAX_ATTEMPTS", "1000")]).await;
    // Every sandbox call fails, transiently, until this agent is replaced.
    let failing = [otlp, FAST_EXPORT, ("HANGAR_SIM_ERROR_RATE", "1")];
    cluster.spawn_agent("host-1", &failing).await;
    // Queued before any worker runs, so the worker claims them as one batch.
    let mut creates = Vec::new();
    for _ in 0..3 {
        creates.push(cluster.create_capsule("base").await.0);
    }
    cluster.spawn_worker(
        "worker",
        &[otlp, FAST_EXPORT, ("HANGAR_RETRY_CAP_MS", "300")],
    );
    for op in &creates {
        receiver
            .wait_for("a second attempt", |s| attempt_of(s, op) == Some(2))
            .await;
    }
    cluster.kill("host-1");
    cluster.spawn_agent("host-1", &[otlp, FAST_EXPORT]).await;

    let mut traces = Vec::new();
    for op in &creates {
        assert_eq!(cluster.wait_operation(op).await["status"], "succeeded");
        let attempts = {
            let mut conn = cluster.env.pool.acquire().await.unwrap();
            let id = op.parse().unwrap();
            let row = hangar_jobs::store::operations::get(&mut conn, None, id);
            row.await.unwrap().unwrap().attempts as u32
        };
        // Attempts end in order, so once the last is exported every earlier one is too.
        receiver
            .wait_for("the last attempt", |s| attempt_of(s, op) == Some(attempts))
            .await;
        let all = receiver.spans();
        let enqueue = all
            .iter()
            .find(|s| s.name == "enqueue" && s.attributes.get("operation_id") == Some(op))
            .expect("the enqueue span");
        let request = all
            .iter()
            .find(|s| is_request(s, "POST", "/v1/capsules") && descends_from(&all, enqueue, s))
            .expect("the create request above the enqueue");
        let mut numbers = Vec::new();
        for job in all.iter().filter(|s| attempt_of(s, op).is_some()) {
            assert!(descends_from(&all, job, request), "{job:#?}");
            numbers.push(attempt_of(job, op).unwrap());
        }
        // The first attempt ran in the batch: its agent call is under that attempt's span.
        let first = all.iter().find(|s| attempt_of(s, op) == Some(1)).unwrap();
        let call = all
            .iter()
            .find(|s| s.name == "grpc.client" && s.parent_span_id == first.span_id);
        assert!(call.is_some(), "no gRPC call under {first:#?}");
        numbers.sort_unstable();
        assert_eq!(
            numbers,
            (1..=attempts).collect::<Vec<_>>(),
            "one span per attempt"
        );
        traces.push(request.trace_id.clone());
    }
    traces.sort();
    traces.dedup();
    assert_eq!(traces.len(), creates.len(), "each create its own trace");
}
