//! A fake OIDC issuer over real TLS: `/.well-known/openid-configuration` and
//! `/keys` (the JWKS, replaceable at run time, counted; can be made to fail).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

struct Inner {
    jwks: Mutex<Value>,
    key_fetches: AtomicUsize,
    discoveries: AtomicUsize,
    failing: AtomicBool,
    base: String,
}

/// A running fake issuer; stops when dropped.
pub struct FakeIssuer {
    pub addr: SocketAddr,
    pub ca_pem: String,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeIssuer {
    pub async fn start(jwks: Value) -> FakeIssuer {
        let (ca_pem, tls) = super::apiserver::tls_config();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Inner {
            jwks: Mutex::new(jwks),
            key_fetches: AtomicUsize::new(0),
            discoveries: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
            base: format!("https://{addr}"),
        });
        let router = axum::Router::new()
            .route("/keys", get(keys))
            .route("/.well-known/openid-configuration", get(discovery))
            .with_state(inner.clone());
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let router = router.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(tls),
                        hyper_util::service::TowerToHyperService::new(router),
                    )
                    .await;
                });
            }
        });
        FakeIssuer {
            addr,
            ca_pem,
            inner,
            task,
        }
    }

    /// The issuer URL (`iss` of its tokens).
    pub fn issuer(&self) -> String {
        self.inner.base.clone()
    }

    pub fn jwks_uri(&self) -> String {
        format!("{}/keys", self.inner.base)
    }

    pub fn set_jwks(&self, jwks: Value) {
        *self.inner.jwks.lock().unwrap() = jwks;
    }

    /// Makes every endpoint answer 503 (or work again).
    pub fn set_failing(&self, failing: bool) {
        self.inner.failing.store(failing, Ordering::SeqCst);
    }

    pub fn key_fetches(&self) -> usize {
        self.inner.key_fetches.load(Ordering::SeqCst)
    }

    pub fn discoveries(&self) -> usize {
        self.inner.discoveries.load(Ordering::SeqCst)
    }
}

fn json_response(body: &Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        serde_json::to_vec(body).unwrap(),
    )
        .into_response()
}

async fn keys(State(s): State<Arc<Inner>>) -> Response {
    s.key_fetches.fetch_add(1, Ordering::SeqCst);
    if s.failing.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let jwks = s.jwks.lock().unwrap().clone();
    json_response(&jwks)
}

async fn discovery(State(s): State<Arc<Inner>>) -> Response {
    s.discoveries.fetch_add(1, Ordering::SeqCst);
    if s.failing.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    json_response(&json!({"issuer": s.base, "jwks_uri": format!("{}/keys", s.base)}))
}
