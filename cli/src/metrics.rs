//! The `/metrics` listener of `hangar worker` and `hangar agent` (the API serves its own
//! route): a small HTTP server rendering the process's registry.

use std::future::Future;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::routing::get;
use prometheus_client::registry::Registry;

/// A `--metrics-listen` value: an address, or empty for no listener.
#[derive(Clone, Copy, Debug)]
pub struct MetricsListen(pub Option<SocketAddr>);

impl FromStr for MetricsListen {
    type Err = std::net::AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "" => Ok(Self(None)),
            addr => addr.parse().map(|a| Self(Some(a))),
        }
    }
}

/// Binds `listen` (a failure is fatal: a misconfigured port should not go unnoticed) and
/// serves `registry` at `/metrics` until `shutdown` resolves, in a task of its own.
pub async fn spawn(
    listen: MetricsListen,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let Some(addr) = listen.0 else {
        tracing::info!("metrics listener off");
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener {addr}"))?;
    tracing::info!(url = %format!("http://{}/metrics", listener.local_addr()?), "metrics listening");
    let registry = Arc::new(registry);
    let app = Router::new().route(
        "/metrics",
        get(move || async move { hangar_api::metrics::render(&registry) }),
    );
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(%error, "the metrics listener failed");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_turns_the_listener_off() {
        assert!(MetricsListen::from_str("").unwrap().0.is_none());
        assert!(MetricsListen::from_str(" ").unwrap().0.is_none());
        let on = MetricsListen::from_str("127.0.0.1:9101").unwrap();
        assert_eq!(on.0, Some("127.0.0.1:9101".parse().unwrap()));
        assert!(MetricsListen::from_str("nope").is_err());
    }
}
