//! Serving gRPC connections: HTTP/2 with few streams per connection, a
//! deadline on every request that also covers waiting for its body, load
//! shedding beyond a global in-flight cap, and connections that end: a peer
//! that never sends the HTTP/2 preface is dropped, and every connection is
//! sent GOAWAY when it reaches its maximum age or the CA changes (so the
//! client reconnects and its certificate is checked again by the handshake).

use std::collections::HashMap;
use std::convert::Infallible;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tonic::Status;
use tonic::body::Body;
use tonic::service::Routes;
use tonic::transport::server::Connected;
use tower::ServiceExt;
use tracing::debug;

use crate::ca::Current;
use crate::limits::{self, Limits};
use crate::metrics::Metrics;
use crate::tls::Accepted;

/// The client connection preface every HTTP/2 connection starts with.
const HTTP2_PREFACE_LEN: u64 = 24;
/// After a CA change each connection is sent GOAWAY at a point spread over
/// [within / 6, within) (`--ca-change-close-within`, [10 s, 60 s) by
/// default): a rotation does not make every client reconnect at once, and
/// requests racing the swap finish first (tonic clients fail a request that is
/// pending when GOAWAY arrives, so closing right away would turn a clean
/// reload into errors). Requests on the old connection meanwhile are checked
/// against the new roots by the client-certificate authenticator.
fn ca_change_close_delay(within: Duration, jitter: u64) -> Duration {
    let min = within / 6;
    min + (within - min).mul_f64(fraction(jitter))
}
/// How often the CA pointer is compared to detect a reload.
const CA_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Streams an HTTP/2 peer may reset or get refused before GOAWAY (h2's
/// defence against rapid-reset floods; hyper's defaults are 20 and 1024).
const HTTP2_MAX_PENDING_ACCEPT_RESETS: usize = 20;
const HTTP2_MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// Serves every connection `incoming` yields until `stop` flips, then sends
/// each GOAWAY and completes when all have closed.
pub async fn serve(
    mut incoming: mpsc::Receiver<Accepted>,
    routes: Routes,
    limits: Limits,
    ca: Arc<Current>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let shared = Arc::new(Shared {
        routes: routes.prepare(),
        inflight: Arc::new(Semaphore::new(limits.max_inflight_requests)),
        metrics,
        limits,
    });
    let ca_changes = watch_ca(ca, stop.clone());
    let mut connections = JoinSet::new();
    let connection_stop = stop.clone();
    loop {
        tokio::select! {
            accepted = incoming.recv() => match accepted {
                Some(accepted) => {
                    connections.spawn(serve_connection(
                        accepted,
                        shared.clone(),
                        connection_stop.clone(),
                        ca_changes.clone(),
                    ));
                }
                None => break,
            },
            Some(_) = connections.join_next() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    drop(incoming);
    while connections.join_next().await.is_some() {}
}

/// Listener metrics, registered with the others.
#[derive(Debug, Default)]
pub struct NetMetrics {
    pub grpc_connections: Gauge,
    pub grpc_handshakes: Gauge,
    pub grpc_streams: Gauge,
    pub monitoring_connections: Gauge,
    pub rejected_connections: Family<RejectLabels, Counter>,
    pub closed_connections: Family<CloseLabels, Counter>,
    pub shed_requests: Counter,
    pub request_timeouts: Counter,
}

impl NetMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "plugca_grpc_open_connections",
            "gRPC connections past the TLS handshake",
            self.grpc_connections.clone(),
        );
        registry.register(
            "plugca_grpc_handshakes_in_progress",
            "TLS handshakes in progress on the gRPC port",
            self.grpc_handshakes.clone(),
        );
        registry.register(
            "plugca_grpc_open_streams",
            "gRPC requests in flight, including those still waiting for their body",
            self.grpc_streams.clone(),
        );
        registry.register(
            "plugca_monitoring_open_connections",
            "Connections open on the monitoring port",
            self.monitoring_connections.clone(),
        );
        registry.register(
            "plugca_rejected_connections",
            "Connections closed at once or dropped before serving, by port and reason",
            self.rejected_connections.clone(),
        );
        registry.register(
            "plugca_closed_connections",
            "gRPC connections the server closed, by reason",
            self.closed_connections.clone(),
        );
        registry.register(
            "plugca_grpc_shed_requests",
            "gRPC requests refused with RESOURCE_EXHAUSTED because too many were in flight",
            self.shed_requests.clone(),
        );
        registry.register(
            "plugca_grpc_request_timeouts",
            "gRPC requests that reached the request deadline (body or response too slow)",
            self.request_timeouts.clone(),
        );
    }

    pub fn rejected(&self, port: Port, reason: RejectReason) {
        self.rejected_connections
            .get_or_create(&RejectLabels { port, reason })
            .inc();
    }

    fn closed(&self, reason: CloseReason) {
        self.closed_connections
            .get_or_create(&CloseLabels { reason })
            .inc();
    }
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Port {
    grpc,
    monitoring,
}

/// Why a connection was refused before it was served.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RejectReason {
    connection_limit,
    connection_limit_per_ip,
    handshake_limit,
    handshake_limit_per_ip,
    handshake_timeout,
    handshake_failed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub port: Port,
    pub reason: RejectReason,
}

/// Why the server ended a served connection.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CloseReason {
    /// TLS finished but the HTTP/2 preface did not arrive in time.
    preface_timeout,
    max_age,
    ca_changed,
    /// Requests still open a grace period after GOAWAY.
    grace_expired,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    pub reason: CloseReason,
}

/// Increments a gauge now and decrements it on drop.
pub struct GaugeGuard(Gauge);

impl From<Gauge> for GaugeGuard {
    fn from(gauge: Gauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counts per source address, for per-address caps.
#[derive(Debug, Default)]
pub struct PerIp {
    counts: Mutex<HashMap<IpAddr, usize>>,
}

impl PerIp {
    /// One more for `ip`, unless it already holds `limit`.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr, limit: usize) -> Option<PerIpGuard> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(PerIpGuard {
            owner: self.clone(),
            ip,
        })
    }

    #[cfg(test)]
    fn count(&self, ip: IpAddr) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.get(&ip).copied().unwrap_or(0)
    }
}

/// Releases one count of its address on drop (entries at zero are removed).
pub struct PerIpGuard {
    owner: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for PerIpGuard {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

struct Shared {
    routes: Routes,
    inflight: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    limits: Limits,
}

impl Shared {
    /// One request: shed over the in-flight cap, else run it under the request
    /// deadline. Unary handlers read the whole body inside the routed future,
    /// so the deadline covers a client that sends headers and never a body.
    async fn call(
        self: Arc<Self>,
        request: http::Request<Incoming>,
    ) -> Result<http::Response<Body>, Infallible> {
        let Ok(_permit) = self.inflight.clone().try_acquire_owned() else {
            self.metrics.net.shed_requests.inc();
            return Ok(status_response(Status::resource_exhausted(
                "too many requests in flight; retry later",
            )));
        };
        let _open = GaugeGuard::from(self.metrics.net.grpc_streams.clone());
        let routed = self.routes.clone().oneshot(request);
        match tokio::time::timeout(self.limits.request_timeout, routed).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(never)) => match never {},
            Err(_) => {
                self.metrics.net.request_timeouts.inc();
                Ok(status_response(Status::deadline_exceeded(
                    "request deadline exceeded",
                )))
            }
        }
    }
}

/// `x` mapped onto [0, 1).
fn fraction(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// A trailers-only gRPC response carrying `status`.
fn status_response(status: Status) -> http::Response<Body> {
    let (parts, ()) = status.into_http::<()>().into_parts();
    http::Response::from_parts(parts, Body::empty())
}

async fn serve_connection(
    accepted: Accepted,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    mut ca_changes: watch::Receiver<u64>,
) {
    let Accepted { stream, peer, slot } = accepted;
    let _slot = slot;
    // What tonic's own server puts in each request: peer address and chain.
    let connect_info = stream.connect_info();
    let io = CountingIo::new(stream);
    let bytes_read = io.bytes_read.clone();
    let service = {
        let shared = shared.clone();
        hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
            request.extensions_mut().insert(connect_info.clone());
            shared.clone().call(request)
        })
    };
    let limits = &shared.limits;
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams_per_connection)
        .max_header_list_size(limits::HTTP2_MAX_HEADER_LIST_BYTES)
        .keep_alive_interval(limits::HTTP2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(limits::HTTP2_KEEPALIVE_TIMEOUT)
        .max_pending_accept_reset_streams(HTTP2_MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(HTTP2_MAX_LOCAL_ERROR_RESETS);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let jitter = RandomState::new().hash_one(peer);
    let preface = tokio::time::sleep(limits.preface_timeout);
    // Up to 10% early, so connections opened together do not all close together.
    let age = tokio::time::sleep(
        limits
            .max_connection_age
            .mul_f64(1.0 - fraction(jitter) / 10.0),
    );
    let ca_close = tokio::time::sleep(Duration::MAX / 4);
    let grace = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(preface, age, ca_close, grace);
    let mut preface_checked = false;
    let mut ca_close_armed = false;
    let mut closing = false;
    // A CA change before this connection was accepted is not news to it.
    ca_changes.borrow_and_update();
    loop {
        let reason = tokio::select! {
            result = &mut conn => {
                if let Err(e) = result {
                    debug!(%peer, error = %e, "gRPC connection ended with an error");
                }
                return;
            }
            _ = &mut preface, if !preface_checked => {
                preface_checked = true;
                if bytes_read.load(Ordering::Relaxed) < HTTP2_PREFACE_LEN {
                    shared.metrics.net.closed(CloseReason::preface_timeout);
                    debug!(%peer, "no HTTP/2 preface in time; closing");
                    return;
                }
                continue;
            }
            _ = &mut age, if !closing => Some(CloseReason::max_age),
            Ok(()) = ca_changes.changed(), if !closing && !ca_close_armed => {
                ca_close_armed = true;
                let delay = ca_change_close_delay(limits.ca_change_close_within, jitter);
                ca_close.as_mut().reset(tokio::time::Instant::now() + delay);
                continue;
            }
            _ = &mut ca_close, if ca_close_armed && !closing => Some(CloseReason::ca_changed),
            _ = stop.wait_for(|s| *s), if !closing => None,
            _ = &mut grace, if closing => {
                shared.metrics.net.closed(CloseReason::grace_expired);
                debug!(%peer, "requests still open after GOAWAY grace; closing");
                return;
            }
        };
        closing = true;
        if let Some(reason) = reason {
            shared.metrics.net.closed(reason);
            debug!(%peer, ?reason, "sending GOAWAY");
            grace
                .as_mut()
                .reset(tokio::time::Instant::now() + limits::GRACEFUL_CLOSE_GRACE);
        }
        conn.as_mut().graceful_shutdown();
    }
}

/// Publishes a new number each time the CA bundle is swapped (reload, root
/// rotation, self-signed renewal), by watching the pointer the handler reads:
/// every path that changes the CA is seen, whoever swapped it.
fn watch_ca(ca: Arc<Current>, mut stop: watch::Receiver<bool>) -> watch::Receiver<u64> {
    let (tx, rx) = watch::channel(0u64);
    tokio::spawn(async move {
        let mut seen = ca.current();
        let mut tick = tokio::time::interval(CA_POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let now = ca.current();
            let same = match (&seen, &now) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                seen = now;
                tx.send_modify(|g| *g += 1);
            }
        }
    });
    rx
}

/// Counts the bytes read from a stream, to tell a peer that sent its HTTP/2
/// preface from one that finished TLS and went silent.
struct CountingIo<T> {
    inner: T,
    bytes_read: Arc<AtomicU64>,
}

impl<T> CountingIo<T> {
    fn new(inner: T) -> Self {
        CountingIo {
            inner,
            bytes_read: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountingIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountingIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_per_address_cap_refuses_beyond_the_limit_and_frees_on_drop() {
        let per_ip = Arc::new(PerIp::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = per_ip.try_acquire(a, 2).unwrap();
        let _second = per_ip.try_acquire(a, 2).unwrap();
        assert!(per_ip.try_acquire(a, 2).is_none());
        assert!(per_ip.try_acquire(b, 2).is_some());
        drop(first);
        assert!(per_ip.try_acquire(a, 2).is_some());
        assert_eq!(per_ip.count(b), 0, "released entries are removed");
    }

    #[test]
    fn goaway_after_a_ca_change_falls_within_the_last_five_sixths_of_the_window() {
        let within = Duration::from_secs(60);
        assert_eq!(ca_change_close_delay(within, 0), Duration::from_secs(10));
        for jitter in [1, u64::MAX / 3, u64::MAX / 2, u64::MAX] {
            let d = ca_change_close_delay(within, jitter);
            assert!(d >= Duration::from_secs(10) && d <= within, "{d:?}");
        }
    }
}
