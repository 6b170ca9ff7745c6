//! Logging and tracing. Logs are human-readable by default, JSON with `--log-format json`.
//! Traces go over OTLP/gRPC when an endpoint is configured (off by default): each process
//! exports its spans as `hangar-<role>`, and the W3C propagator carries the context from
//! the HTTP request through the job to the host agent (`hangar_jobs::trace_context`).

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Where traces go, if anywhere.
#[derive(Debug, Clone, clap::Args)]
pub struct TracingArgs {
    /// OTLP/gRPC endpoint to export traces to (e.g. `http://127.0.0.1:4317`); tracing is
    /// off when neither this nor `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    #[arg(long, global = true, env = "HANGAR_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

impl TracingArgs {
    fn endpoint(&self) -> Option<String> {
        let standard = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok();
        self.otlp_endpoint
            .clone()
            .or(standard)
            .filter(|e| !e.is_empty())
    }
}

/// Keeps the trace exporter alive; [`Telemetry::shutdown`] flushes what is buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Installs the log subscriber and, when configured, the OTLP trace exporter. `role` names
/// the process in traces (`hangar-api`, `hangar-worker`, …). Must run inside the runtime.
pub fn init(format: LogFormat, tracing: &TracingArgs, role: &str) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_env("HANGAR_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,h2=warn,tower=warn,hyper=warn"));
    let provider = tracing
        .endpoint()
        .map(|e| tracer_provider(&e, role))
        .transpose()?;
    let otel = provider.as_ref().map(|p| {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        hangar_proto::trace_context::enable();
        tracing_opentelemetry::layer().with_tracer(p.tracer("hangar"))
    });
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let fmt = tracing_subscriber::fmt::layer().with_target(false);
    match format {
        LogFormat::Human => registry.with(fmt).init(),
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).init(),
    }
    if let Some(endpoint) = tracing.endpoint() {
        tracing::info!(%endpoint, service = %service_name(role), "exporting traces over OTLP");
    }
    Ok(Telemetry { provider })
}

fn service_name(role: &str) -> String {
    std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| format!("hangar-{role}"))
}

fn tracer_provider(endpoint: &str, role: &str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .with_context(|| format!("OTLP exporter for {endpoint}"))?;
    let resource = Resource::builder()
        .with_service_name(service_name(role))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

impl Telemetry {
    /// Exports the spans still buffered (called once the process's work has stopped).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The batch exporter flushes on its own thread and blocks the caller meanwhile.
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(error)) = flushed {
            tracing::warn!(%error, "could not flush the last traces");
        }
    }
}
