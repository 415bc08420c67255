//! The HTTP monitoring listener: `/ready`, `/healthz`, `/metrics`. These
//! handlers only read atomics and the current bundle pointer, so they never
//! wait behind signing work. Connections are capped (far below the open-file
//! limit, so this port cannot starve gRPC or reloads of descriptors), must
//! send their request head within a few seconds, and are closed after a
//! minute even when busy.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use time::OffsetDateTime;

use crate::ca::Current;
use crate::limits::{self, Limits};
use crate::metrics::Metrics;
use crate::net::{GaugeGuard, PerIp, Port, RejectReason};
use crate::server::harness::{Fault, Faults, IssuedLog};

#[derive(Clone)]
pub struct MonitoringState {
    pub ca: Arc<Current>,
    pub metrics: Arc<Metrics>,
    /// Set once the gRPC listener is serving.
    pub serving: Arc<AtomicBool>,
    /// Fault injection admin, only in test-harness mode.
    pub faults: Option<Arc<Faults>>,
    pub issued_log: Option<Arc<IssuedLog>>,
}

/// Largest admin request body.
const MAX_ADMIN_BODY: usize = 16 * 1024;

pub fn router(state: MonitoringState) -> Router {
    let mut router = Router::new()
        .route("/ready", get(ready))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics));
    if state.faults.is_some() {
        router = router
            .route(
                "/faults",
                get(faults_get).put(faults_put).delete(faults_delete),
            )
            .route("/faults/next", post(faults_next))
            .route("/issued", get(issued));
    }
    router
        .layer(axum::extract::DefaultBodyLimit::max(MAX_ADMIN_BODY))
        .with_state(state)
}

/// Serves `router` on `listener` until `stop` flips, then lets open requests
/// finish (each connection is closed gracefully).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(
        limits.max_monitoring_connections,
    ));
    // Probes (kubelet) and scrapes (Prometheus) come from other addresses
    // than a peer filling the port.
    let per_ip = Arc::new(PerIp::default());
    let per_ip_limit = limits::MONITORING_CONNECTIONS_PER_IP.min(limits.max_monitoring_connections);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(_) = connections.join_next() => continue,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(error = %e, "monitoring accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        // Over the cap: close at once rather than queue (a scrape retries).
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics
                .net
                .rejected(Port::monitoring, RejectReason::connection_limit);
            tracing::debug!(%peer, "monitoring connection over the cap closed");
            continue;
        };
        let Some(slot_per_ip) = per_ip.try_acquire(peer.ip(), per_ip_limit) else {
            metrics
                .net
                .rejected(Port::monitoring, RejectReason::connection_limit_per_ip);
            tracing::debug!(%peer, "monitoring connection over the per-address cap closed");
            continue;
        };
        let open = GaugeGuard::from(metrics.net.monitoring_connections.clone());
        let router = router.clone();
        let stop = stop.clone();
        connections.spawn(serve_connection(
            tcp,
            router,
            stop,
            (slot, slot_per_ip, open),
        ));
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

async fn serve_connection<G>(
    tcp: tokio::net::TcpStream,
    router: Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
    _slot: G,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt as _;
    let service =
        hyper::service::service_fn(move |request: axum::http::Request<hyper::body::Incoming>| {
            router.clone().oneshot(request.map(axum::body::Body::new))
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // hyper applies the header timeout to every request head, including the
    // wait for the next one on a kept-alive connection.
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits::MONITORING_HEADER_TIMEOUT)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(tcp), service);
    tokio::pin!(conn);
    let age = tokio::time::sleep(limits::MONITORING_MAX_CONNECTION_AGE);
    tokio::pin!(age);
    let mut closing = false;
    loop {
        tokio::select! {
            _ = &mut conn => return,
            _ = &mut age, if !closing => {}
            _ = stop.wait_for(|s| *s), if !closing => {}
            // A peer still sending after the grace period is cut off.
            _ = tokio::time::sleep(limits::MONITORING_HEADER_TIMEOUT), if closing => return,
        }
        closing = true;
        conn.as_mut().graceful_shutdown();
    }
}

/// Fault specs, one per line or comma-separated.
fn parse_faults(body: &str) -> Result<Vec<Fault>, (StatusCode, String)> {
    body.split(['\n', ','])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<Fault>()
                .map_err(|e| (StatusCode::BAD_REQUEST, format!("{e}\n")))
        })
        .collect()
}

async fn faults_get(State(state): State<MonitoringState>) -> impl IntoResponse {
    let faults = state.faults.map(|f| f.global()).unwrap_or_default();
    faults
        .iter()
        .map(|f| format!("{f:?}\n"))
        .collect::<String>()
}

async fn faults_put(State(state): State<MonitoringState>, body: String) -> impl IntoResponse {
    match (parse_faults(&body), state.faults) {
        (Ok(list), Some(f)) => {
            if let Err(e) = f.check(&list) {
                return (StatusCode::BAD_REQUEST, format!("{e}\n"));
            }
            tracing::warn!(faults = ?list, "fault injection: global faults set");
            f.set_global(list);
            (StatusCode::OK, "ok\n".to_string())
        }
        (Err(e), _) => e,
        (_, None) => (StatusCode::NOT_FOUND, "fault injection disabled\n".into()),
    }
}

async fn faults_next(State(state): State<MonitoringState>, body: String) -> impl IntoResponse {
    match (parse_faults(&body), state.faults) {
        (Ok(list), Some(f)) => {
            if let Err(e) = f.check(&list) {
                return (StatusCode::BAD_REQUEST, format!("{e}\n"));
            }
            f.push_next(list);
            (StatusCode::OK, "ok\n".to_string())
        }
        (Err(e), _) => e,
        (_, None) => (StatusCode::NOT_FOUND, "fault injection disabled\n".into()),
    }
}

async fn faults_delete(State(state): State<MonitoringState>) -> impl IntoResponse {
    if let Some(f) = state.faults {
        f.clear();
    }
    "ok\n"
}

async fn issued(State(state): State<MonitoringState>) -> impl IntoResponse {
    let records = state.issued_log.map(|l| l.all()).unwrap_or_default();
    let json: Vec<serde_json::Value> = records
        .iter()
        .map(|r| {
            serde_json::json!({
                "serial": r.serial_hex,
                "sans": r.sans,
                "leaf_pem": r.leaf_pem,
                "cert_chain": r.cert_chain,
            })
        })
        .collect();
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::Value::Array(json).to_string(),
    )
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
