//! The HTTP monitoring listener: `/ready`, `/healthz`, `/metrics`. These
//! handlers only read atomics and the current bundle pointer, so they never
//! wait behind signing work.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use time::OffsetDateTime;

use crate::metrics::Metrics;
use crate::server::CaState;

#[derive(Clone)]
pub struct MonitoringState {
    pub ca: Arc<CaState>,
    pub metrics: Arc<Metrics>,
    /// Set once the gRPC listener is serving.
    pub serving: Arc<AtomicBool>,
}

pub fn router(state: MonitoringState) -> Router {
    Router::new()
        .route("/ready", get(ready))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Why the server is not ready, if it is not.
pub fn not_ready_reason(state: &MonitoringState) -> Option<String> {
    if !state.serving.load(Ordering::Acquire) {
        return Some("gRPC listener not serving yet".into());
    }
    let Some(bundle) = state.ca.current() else {
        return Some("no CA bundle loaded".into());
    };
    let signing = bundle.signing_cert();
    if OffsetDateTime::now_utc() >= signing.not_after {
        return Some(format!(
            "signing certificate expired at {}",
            crate::ca::cert::rfc3339(signing.not_after)
        ));
    }
    None
}

async fn ready(State(state): State<MonitoringState>) -> impl IntoResponse {
    match not_ready_reason(&state) {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

async fn metrics(State(state): State<MonitoringState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
