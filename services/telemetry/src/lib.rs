//! What every idlemeter service exposes about itself: tracing logs, Prometheus
//! metrics at `/metrics` and a health check at `/health`.
//!
//! Each service owns a [`prometheus::Registry`] (no global registry, so tests can
//! run several services in one process) and names its metrics
//! `idlemeter_<service>_<what>_<unit>`.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;

/// Installs the global tracing subscriber once; `RUST_LOG` filters (default `info`).
/// Safe to call more than once (later calls do nothing), which tests rely on.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Whether a service considers itself able to do its job; `/health` answers 200
/// or 503 from it.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<AtomicBool>);

impl Health {
    pub fn set_healthy(&self, healthy: bool) {
        self.0.store(healthy, Ordering::Relaxed);
    }
    pub fn is_healthy(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct Exposed {
    registry: Registry,
    health: Health,
}

/// Serves `/metrics` and `/health` on `listener` until `shutdown` completes.
pub async fn serve_metrics(
    listener: TcpListener,
    registry: Registry,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/health", get(render_health))
        .with_state(Exposed { registry, health });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn render_metrics(State(exposed): State<Exposed>) -> impl IntoResponse {
    let mut body = Vec::new();
    let encoder = TextEncoder::new();
    match encoder.encode(&exposed.registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_owned())],
            body,
        ),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain".to_owned())],
            format!("encoding metrics failed: {error}").into_bytes(),
        ),
    }
}

async fn render_health(State(exposed): State<Exposed>) -> impl IntoResponse {
    if exposed.health.is_healthy() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
    }
}
