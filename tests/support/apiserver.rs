//! An in-process fake Kubernetes API server over real TLS, answering what
//! plugca asks the way the API server does:
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews` (counted; tokens are
//!   registered by the test with the review they should get);
//! - `GET /api/v1/pods` (list) and `GET /api/v1/pods?watch=true&resourceVersion=N`
//!   (the streaming JSON watch format: one `{"type": ..., "object": ...}` per line).
//!
//! plugca reaches it with a real kube client through a real kubeconfig file
//! (token auth, CA data), so the whole client path is exercised.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use plugca::ca::generate::{self, CaSpec, KeyChoice};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};

/// The bearer token plugca's kubeconfig presents to the fake.
pub const ADMIN_TOKEN: &str = "plugca-admin-token";

/// What a TokenReview of a registered token answers.
#[derive(Debug, Clone)]
pub enum Review {
    /// `system:serviceaccount:<ns>:<sa>` in group `system:serviceaccounts`,
    /// with pod name/UID in `extra` for bound tokens.
    ServiceAccount {
        namespace: String,
        name: String,
        pod: Option<(String, String)>,
    },
    /// An authenticated user with the given name and groups.
    User {
        username: String,
        groups: Vec<String>,
    },
    /// `authenticated: false` without an error (unregistered tokens get an
    /// `error`, as the API server gives for tokens it cannot verify).
    NotAuthenticated,
    /// A service account token accepted for other audiences than requested
    /// (`status.audiences` names only `kubernetes.default.svc`).
    OtherAudience { namespace: String, name: String },
}

/// A pod as the fake stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakePod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    pub node: Option<String>,
    pub phase: String,
}

impl FakePod {
    pub fn running(namespace: &str, name: &str, service_account: &str, node: &str) -> Self {
        FakePod {
            namespace: namespace.into(),
            name: name.into(),
            uid: format!("uid-{namespace}-{name}"),
            service_account: service_account.into(),
            node: Some(node.into()),
            phase: "Running".into(),
        }
    }

    fn to_json(&self, resource_version: u64) -> Value {
        let mut spec = json!({"serviceAccountName": self.service_account, "containers": []});
        if let Some(node) = &self.node {
            spec["nodeName"] = json!(node);
        }
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "uid": self.uid,
                "resourceVersion": resource_version.to_string(),
            },
            "spec": spec,
            "status": {"phase": self.phase},
        })
    }
}

#[derive(Default)]
struct Pods {
    /// `(ns, name)` -> pod and the resource version of its last change.
    current: BTreeMap<(String, String), (FakePod, u64)>,
    /// Every change in order: (resource version, watch event JSON).
    events: Vec<(u64, Value)>,
    resource_version: u64,
}

struct Inner {
    tokens: Mutex<HashMap<String, Review>>,
    reviews: AtomicUsize,
    audiences: Mutex<Vec<Vec<String>>>,
    review_delay: Mutex<Option<Duration>>,
    pod_lists: AtomicUsize,
    pod_watches: AtomicUsize,
    pods: Mutex<Pods>,
    changed: tokio::sync::Notify,
}

/// A running fake API server; stops when dropped.
pub struct FakeApiServer {
    pub addr: SocketAddr,
    ca_pem: String,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApiServer {
    pub async fn start() -> FakeApiServer {
        let (ca_pem, tls) = tls_config();
        let inner = Arc::new(Inner {
            tokens: Mutex::new(HashMap::new()),
            reviews: AtomicUsize::new(0),
            audiences: Mutex::new(Vec::new()),
            review_delay: Mutex::new(None),
            pod_lists: AtomicUsize::new(0),
            pod_watches: AtomicUsize::new(0),
            pods: Mutex::new(Pods::default()),
            changed: tokio::sync::Notify::new(),
        });
        let router = axum::Router::new()
            .route(
                "/apis/authentication.k8s.io/v1/tokenreviews",
                post(token_review),
            )
            .route("/api/v1/pods", get(pods))
            .fallback(|uri: Uri| async move {
                status_response(StatusCode::NOT_FOUND, &format!("the fake has no {uri}"))
            })
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
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
                    let service = hyper_util::service::TowerToHyperService::new(router);
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
                });
            }
        });
        FakeApiServer {
            addr,
            ca_pem,
            inner,
            task,
        }
    }

    /// A kubeconfig file for this server (real CA data and token auth).
    pub fn write_kubeconfig(&self, path: &Path) -> PathBuf {
        write_kubeconfig(path, &format!("https://{}", self.addr), &self.ca_pem);
        path.to_path_buf()
    }

    /// Registers `token` to get `review`.
    pub fn register(&self, token: &str, review: Review) {
        self.inner
            .tokens
            .lock()
            .unwrap()
            .insert(token.to_string(), review);
    }

    /// A fresh JWT-shaped token (unsigned; only the fake reads it) expiring in
    /// an hour, registered as a service account token, bound to `pod` if given.
    pub fn sa_token(&self, namespace: &str, name: &str, pod: Option<&FakePod>) -> String {
        let token = jwt_shaped(&format!("system:serviceaccount:{namespace}:{name}"), 3600);
        self.register(
            &token,
            Review::ServiceAccount {
                namespace: namespace.into(),
                name: name.into(),
                pod: pod.map(|p| (p.name.clone(), p.uid.clone())),
            },
        );
        token
    }

    /// TokenReview calls so far.
    pub fn reviews(&self) -> usize {
        self.inner.reviews.load(Ordering::SeqCst)
    }

    /// `spec.audiences` of every TokenReview so far.
    pub fn review_audiences(&self) -> Vec<Vec<String>> {
        self.inner.audiences.lock().unwrap().clone()
    }

    /// Makes every TokenReview take `delay` before answering.
    pub fn slow_reviews(&self, delay: Option<Duration>) {
        *self.inner.review_delay.lock().unwrap() = delay;
    }

    pub fn pod_lists(&self) -> usize {
        self.inner.pod_lists.load(Ordering::SeqCst)
    }

    pub fn pod_watches(&self) -> usize {
        self.inner.pod_watches.load(Ordering::SeqCst)
    }

    /// Adds or updates a pod (a watch sees ADDED or MODIFIED).
    pub fn put_pod(&self, pod: FakePod) {
        let mut pods = self.inner.pods.lock().unwrap();
        pods.resource_version += 1;
        let rv = pods.resource_version;
        let key = (pod.namespace.clone(), pod.name.clone());
        let kind = if pods.current.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        pods.events
            .push((rv, json!({"type": kind, "object": pod.to_json(rv)})));
        pods.current.insert(key, (pod, rv));
        drop(pods);
        self.inner.changed.notify_waiters();
    }

    /// Deletes a pod (a watch sees DELETED).
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let mut pods = self.inner.pods.lock().unwrap();
        let Some((pod, _)) = pods
            .current
            .remove(&(namespace.to_string(), name.to_string()))
        else {
            return;
        };
        pods.resource_version += 1;
        let rv = pods.resource_version;
        pods.events
            .push((rv, json!({"type": "DELETED", "object": pod.to_json(rv)})));
        drop(pods);
        self.inner.changed.notify_waiters();
    }
}

/// A kubeconfig pointing at `server` with `ca_pem` and the admin token.
pub fn write_kubeconfig(path: &Path, server: &str, ca_pem: &str) {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let yaml = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: plugca
  user:
    token: {ADMIN_TOKEN}
contexts:
- name: fake
  context:
    cluster: fake
    user: plugca
current-context: fake
"
    );
    std::fs::write(path, yaml).unwrap();
}

/// A kubeconfig for an API server that refuses connections (nothing listens).
pub async fn write_dead_kubeconfig(path: &Path) {
    let port = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let (ca_pem, _) = tls_config();
    write_kubeconfig(path, &format!("https://127.0.0.1:{port}"), &ca_pem);
}

/// `header.payload.signature` with `sub` and `exp` (now + `exp_in` seconds)
/// in the payload and a random `jti`, so each call gives a new token.
pub fn jwt_shaped(sub: &str, exp_in: i64) -> String {
    let b64 = |v: &Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut jti = [0u8; 12];
    getrandom::fill(&mut jti).unwrap();
    format!(
        "{}.{}.{}",
        b64(&json!({"alg": "RS256", "kid": "fake"})),
        b64(
            &json!({"sub": sub, "exp": now + exp_in, "aud": ["istio-ca"],
                    "jti": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(jti)})
        ),
        "c2lnbmF0dXJl"
    )
}

/// A fresh CA (PEM) and a rustls server config for 127.0.0.1 and localhost signed by it.
pub fn tls_config() -> (String, rustls::ServerConfig) {
    let now = time::OffsetDateTime::now_utc();
    let root = generate::self_signed_root(
        &CaSpec {
            organization: Some("fake kube-apiserver".into()),
            common_name: Some("fake kube-apiserver CA".into()),
            locality: None,
            not_before: now - time::Duration::hours(1),
            not_after: now + time::Duration::days(1),
            path_len: None,
            dns_sans: Vec::new(),
        },
        generate::generate_key(KeyChoice::P256).unwrap(),
    )
    .unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(1);
    let issuer =
        rcgen::Issuer::from_ca_cert_der(&CertificateDer::from(root.cert_der.clone()), &root.key)
            .unwrap();
    let leaf = params.signed_by(&key, &issuer).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    (root.cert_pem, config)
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        serde_json::to_vec(body).unwrap(),
    )
        .into_response()
}

/// A `metav1.Status` failure, as the API server sends for errors.
fn status_response(code: StatusCode, message: &str) -> Response {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": code.canonical_reason().unwrap_or(""), "code": code.as_u16()}),
    )
}

fn authorized(headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {ADMIN_TOKEN}"))
}

async fn token_review(State(s): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    if !authorized(&headers) {
        return status_response(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    s.reviews.fetch_add(1, Ordering::SeqCst);
    let delay = *s.review_delay.lock().unwrap();
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return status_response(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let token = request["spec"]["token"].as_str().unwrap_or_default();
    let audiences: Vec<String> = request["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    s.audiences.lock().unwrap().push(audiences.clone());
    let review = s.tokens.lock().unwrap().get(token).cloned();
    let status = match review {
        Some(Review::ServiceAccount {
            namespace,
            name,
            pod,
        }) => {
            let mut user = json!({
                "username": format!("system:serviceaccount:{namespace}:{name}"),
                "uid": "sa-uid",
                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{namespace}"), "system:authenticated"],
            });
            if let Some((pod_name, pod_uid)) = pod {
                user["extra"] = json!({
                    "authentication.kubernetes.io/pod-name": [pod_name],
                    "authentication.kubernetes.io/pod-uid": [pod_uid],
                });
            }
            json!({"authenticated": true, "user": user, "audiences": audiences})
        }
        Some(Review::User { username, groups }) => {
            json!({"authenticated": true, "user": {"username": username, "groups": groups}, "audiences": audiences})
        }
        Some(Review::NotAuthenticated) => json!({"authenticated": false}),
        Some(Review::OtherAudience { namespace, name }) => json!({
            "authenticated": true,
            "user": {"username": format!("system:serviceaccount:{namespace}:{name}"),
                     "groups": ["system:serviceaccounts", "system:authenticated"]},
            "audiences": ["kubernetes.default.svc"],
        }),
        // What the API server says for a token it cannot verify.
        None => {
            json!({"user": {}, "error": "[invalid bearer token, token lookup failed]"})
        }
    };
    json_response(
        StatusCode::CREATED,
        &json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {},
            "spec": {"token": token, "audiences": request["spec"]["audiences"]},
            "status": status,
        }),
    )
}

fn query(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn pods(State(s): State<Arc<Inner>>, headers: HeaderMap, uri: Uri) -> Response {
    if !authorized(&headers) {
        return status_response(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    let q = query(&uri);
    let watching = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    if !watching {
        s.pod_lists.fetch_add(1, Ordering::SeqCst);
        let pods = s.pods.lock().unwrap();
        let items: Vec<Value> = pods
            .current
            .values()
            .map(|(p, rv)| p.to_json(*rv))
            .collect();
        return json_response(
            StatusCode::OK,
            &json!({"kind": "PodList", "apiVersion": "v1",
                    "metadata": {"resourceVersion": pods.resource_version.to_string()},
                    "items": items}),
        );
    }
    s.pod_watches.fetch_add(1, Ordering::SeqCst);
    let mut from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = Duration::from_secs(
        q.get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(290),
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(16);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Register interest before reading, so no change is missed.
            let changed = s.changed.notified();
            let pending: Vec<(u64, Value)> = s
                .pods
                .lock()
                .unwrap()
                .events
                .iter()
                .filter(|(rv, _)| *rv > from)
                .cloned()
                .collect();
            for (rv, event) in pending {
                let mut line = serde_json::to_vec(&event).unwrap();
                line.push(b'\n');
                if tx.send(Ok(Bytes::from(line))).await.is_err() {
                    return;
                }
                from = rv;
            }
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tx.closed() => return,
            }
        }
    });
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
        .into_response()
}
