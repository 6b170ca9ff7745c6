//! W3C trace context across Hangar's processes, so one operation is one trace: the API stores
//! the request's `traceparent` on the operation row, every job attempt takes it as parent,
//! and gRPC calls carry it to the host agent in their metadata ([`Traced`]).
//!
//! Everything here is skipped until the binary turns tracing on ([`enable`], with its OTLP
//! exporter and the W3C propagator): until then `current()` is `None`, nothing is injected
//! or extracted, and the hot paths pay one relaxed atomic load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context as TaskContext, Poll};

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector};
use tonic::codegen::Service;
use tracing::Instrument;
use tracing::instrument::Instrumented;
use tracing_opentelemetry::OpenTelemetrySpanExt;

const TRACEPARENT: &str = "traceparent";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns propagation on (once the process exports traces).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The current span's `traceparent`, or `None` when tracing is off.
pub fn current() -> Option<String> {
    if !enabled() {
        return None;
    }
    let mut carrier = Carrier::default();
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut carrier));
    carrier.traceparent
}

/// Makes `span` a child of the trace `traceparent` names. Call it before the span is first
/// entered; a missing or malformed value leaves the span where it is.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(value) = traceparent.filter(|_| enabled()) else {
        return;
    };
    let carrier = Carrier {
        traceparent: Some(value.to_owned()),
    };
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    set_parent_context(span, parent);
}

/// Makes `span` a child of the trace context in HTTP (or gRPC) request headers, if any.
pub fn set_parent_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    if !enabled() {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)));
    set_parent_context(span, parent);
}

fn set_parent_context(span: &tracing::Span, parent: Context) {
    use opentelemetry::trace::TraceContextExt;
    if parent.span().span_context().is_valid() {
        // Fails only when tracing is off or the span already started: nothing to link then.
        let _ = span.set_parent(parent);
    }
}

/// A gRPC channel whose every call is a `grpc.client` span (a child of the caller's span)
/// and carries that span's context to the server.
#[derive(Debug, Clone)]
pub struct Traced<S>(pub S);

impl<S, B> Service<http::Request<B>> for Traced<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let span = tracing::info_span!("grpc.client", rpc.method = %request.uri().path());
        if enabled() {
            let context = span.context();
            opentelemetry::global::get_text_map_propagator(|p| {
                p.inject_context(&context, &mut HeadersMut(request.headers_mut()))
            });
        }
        self.0.call(request).instrument(span)
    }
}

/// A carrier holding only `traceparent`: what the operation row stores.
#[derive(Default)]
struct Carrier {
    traceparent: Option<String>,
}

impl Injector for Carrier {
    fn set(&mut self, key: &str, value: String) {
        if key == TRACEPARENT {
            self.traceparent = Some(value);
        }
    }
}

impl Extractor for Carrier {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT)
            .then_some(self.traceparent.as_deref())
            .flatten()
    }
    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeadersMut<'a>(&'a mut http::HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(key, value);
        }
    }
}
