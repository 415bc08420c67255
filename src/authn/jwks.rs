//! `--jwt-rule` (istiod's `JWT_RULE`): bearer tokens of an OIDC issuer whose
//! keys are fetched over HTTPS from its JWKS endpoint (`jwks_uri`, or the one
//! named by `<issuer>/.well-known/openid-configuration` when absent).
//!
//! Keys are cached. They are refetched when older than [`REFRESH_INTERVAL`]
//! and when a token names a `kid` the cache lacks (key rotation), at most once
//! per [`MIN_KID_REFETCH_INTERVAL`] so tokens with made-up kids cannot turn
//! into a request storm against the issuer. A failed refetch keeps the old
//! keys; without any keys requests fail with UNAVAILABLE (clients retry).
//! Verification itself is the JWT authenticator's ([`crate::authn::jwt`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use jsonwebtoken::jwk::JwkSet;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde::Deserialize;
use tracing::{info, warn};

use crate::authn::error_chain;
use crate::authn::jwt::{JwtError, KeySet, KeySource, MAX_JWKS_BYTES};

/// Keys older than this are refetched before use.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(600);
/// Refetches for unknown key ids happen at most this often.
pub const MIN_KID_REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// While no keys were ever fetched, a failed fetch is retried after this.
pub const FAILED_FETCH_RETRY: Duration = Duration::from_secs(1);
/// Longest wait for the issuer's endpoints.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// istiod's `JWT_RULE` JSON.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct JwtRule {
    pub issuer: String,
    /// Empty: discover it from the issuer.
    #[serde(default, alias = "jwksUri")]
    pub jwks_uri: String,
    #[serde(default)]
    pub audiences: Vec<String>,
}

impl JwtRule {
    /// Parses and checks `{"issuer", "jwks_uri", "audiences"}`.
    pub fn parse(json: &str) -> Result<Self, String> {
        let rule: JwtRule = serde_json::from_str(json).map_err(|e| {
            format!("not a JWT rule like {{\"issuer\": \"https://...\", \"jwks_uri\": \"https://...\", \"audiences\": [\"istio-ca\"]}}: {e}")
        })?;
        if rule.issuer.is_empty() {
            return Err("\"issuer\" is empty".into());
        }
        if rule.audiences.iter().all(String::is_empty) {
            return Err("\"audiences\" needs at least one audience".into());
        }
        let https = |what: &str, v: &str| -> Result<(), String> {
            let uri: http::Uri = v.parse().map_err(|e| format!("{what} {v:?}: {e}"))?;
            if uri.scheme_str() != Some("https") || uri.host().is_none() {
                return Err(format!("{what} {v:?} is not an https:// URL"));
            }
            Ok(())
        };
        if rule.jwks_uri.is_empty() {
            https("\"issuer\" (used for OIDC discovery)", &rule.issuer)?;
        } else {
            https("\"jwks_uri\"", &rule.jwks_uri)?;
        }
        Ok(rule)
    }

    pub fn audiences(&self) -> Vec<String> {
        self.audiences
            .iter()
            .filter(|a| !a.is_empty())
            .cloned()
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JwksSetupError {
    #[error("--jwt-rule-ca-file {file}: {reason}")]
    CaFile { file: PathBuf, reason: String },
    #[error(
        "--jwt-rule: no trust roots to check {issuer}'s JWKS endpoint (no system roots found); give --jwt-rule-ca-file"
    )]
    NoRoots { issuer: String },
    #[error("--jwt-rule: {0}")]
    Tls(String),
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

#[derive(Default)]
struct State {
    keys: Option<Arc<KeySet>>,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
    last_kid_refetch: Option<Instant>,
    /// The JWKS URL, configured or discovered.
    jwks_uri: Option<String>,
}

/// The keys of a remote JWKS endpoint.
pub struct RemoteJwks {
    rule: JwtRule,
    client: HttpsClient,
    state: Mutex<State>,
    /// One fetch at a time; waiters then see its result.
    fetching: tokio::sync::Mutex<()>,
    fetches: std::sync::atomic::AtomicU64,
}

impl RemoteJwks {
    /// Builds the HTTPS client (system roots plus `ca_file`); fetches nothing yet.
    pub fn new(rule: JwtRule, ca_file: Option<&Path>) -> Result<Self, JwksSetupError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        if let Some(file) = ca_file {
            let ca_err = |reason: String| JwksSetupError::CaFile {
                file: file.to_path_buf(),
                reason,
            };
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(file)
                .map_err(|e| ca_err(e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| ca_err(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_err("no CERTIFICATE in the file".into()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
            }
        }
        if roots.is_empty() {
            return Err(JwksSetupError::NoRoots {
                issuer: rule.issuer.clone(),
            });
        }
        let tls = rustls::ClientConfig::builder_with_provider(crate::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| JwksSetupError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
        Ok(RemoteJwks {
            state: Mutex::new(State {
                jwks_uri: (!rule.jwks_uri.is_empty()).then(|| rule.jwks_uri.clone()),
                ..State::default()
            }),
            rule,
            client,
            fetching: tokio::sync::Mutex::new(()),
            fetches: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// JWKS downloads attempted so far (for tests and logs).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn unavailable(&self, reason: String) -> JwtError {
        JwtError::KeysUnavailable {
            source_: self.describe(),
            reason,
        }
    }

    async fn get(&self, uri: &str) -> Result<Bytes, String> {
        let request = http::Request::get(uri)
            .header("accept", "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(FETCH_TIMEOUT, async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| error_chain(&e))?;
            let status = response.status();
            if !status.is_success() {
                return Err(format!("GET {uri}: HTTP {status}"));
            }
            Limited::new(response.into_body(), MAX_JWKS_BYTES as usize)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .map_err(|e| format!("GET {uri}: {e}"))
        })
        .await
        .map_err(|_| format!("GET {uri}: no answer within {FETCH_TIMEOUT:?}"))??;
        Ok(response)
    }

    async fn jwks_uri(&self) -> Result<String, String> {
        if let Some(uri) = self.state().jwks_uri.clone() {
            return Ok(uri);
        }
        #[derive(Deserialize)]
        struct Discovery {
            jwks_uri: String,
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.rule.issuer.trim_end_matches('/')
        );
        let body = self.get(&url).await?;
        let doc: Discovery = serde_json::from_slice(&body)
            .map_err(|e| format!("{url}: not an OIDC discovery document: {e}"))?;
        if !doc.jwks_uri.starts_with("https://") {
            return Err(format!("{url}: jwks_uri {:?} is not https", doc.jwks_uri));
        }
        self.state().jwks_uri = Some(doc.jwks_uri.clone());
        Ok(doc.jwks_uri)
    }

    async fn download(&self) -> Result<KeySet, String> {
        self.fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let uri = self.jwks_uri().await?;
        let body = self.get(&uri).await?;
        let set: JwkSet = serde_json::from_slice(&body)
            .map_err(|e| format!("{uri}: not a JWKS document: {e}"))?;
        KeySet::from_jwks(&set).ok_or_else(|| format!("{uri}: no usable RSA or EC P-256 key"))
    }
}

#[tonic::async_trait]
impl KeySource for RemoteJwks {
    fn describe(&self) -> String {
        match &self.state().jwks_uri {
            Some(uri) => format!("JWKS {uri}"),
            None => format!("issuer {} (OIDC discovery)", self.rule.issuer),
        }
    }

    fn snapshot(&self) -> Option<Arc<KeySet>> {
        self.state().keys.clone()
    }

    fn stale(&self) -> bool {
        self.state()
            .fetched_at
            .is_none_or(|t| t.elapsed() >= REFRESH_INTERVAL)
    }

    async fn fetch(&self, kid: Option<&str>) -> Result<Arc<KeySet>, JwtError> {
        let _one_at_a_time = self.fetching.lock().await;
        let unknown_kid = {
            let st = self.state();
            match &st.keys {
                Some(keys) => {
                    let fresh = st
                        .fetched_at
                        .is_some_and(|t| t.elapsed() < REFRESH_INTERVAL);
                    let has_kid = kid.is_none_or(|k| keys.has_kid(k));
                    let recently = |t: Option<Instant>| {
                        t.is_some_and(|t| t.elapsed() < MIN_KID_REFETCH_INTERVAL)
                    };
                    // Fresh and complete (another request just refetched), or
                    // a refetch was tried too recently: use what we have.
                    let use_cached = if fresh {
                        has_kid || recently(st.last_kid_refetch)
                    } else {
                        recently(st.last_attempt)
                    };
                    if use_cached {
                        return Ok(keys.clone());
                    }
                    fresh
                }
                None if st
                    .last_attempt
                    .is_some_and(|t| t.elapsed() < FAILED_FETCH_RETRY) =>
                {
                    // Not `self.unavailable()` here: it locks the state again.
                    drop(st);
                    return Err(self.unavailable(format!(
                        "the last fetch failed; retrying at most every {FAILED_FETCH_RETRY:?}"
                    )));
                }
                None => false,
            }
        };
        {
            let mut st = self.state();
            st.last_attempt = Some(Instant::now());
            if unknown_kid {
                st.last_kid_refetch = Some(Instant::now());
            }
        }
        match self.download().await {
            Ok(keys) => {
                let keys = Arc::new(keys);
                info!(source = %self.describe(), keys = keys.len(), "JWKS fetched");
                let mut st = self.state();
                st.keys = Some(keys.clone());
                st.fetched_at = Some(Instant::now());
                Ok(keys)
            }
            Err(reason) => {
                let old = self.state().keys.clone();
                warn!(
                    source = %self.describe(),
                    reason = %reason,
                    keeping_old_keys = old.is_some(),
                    "JWKS fetch failed"
                );
                old.ok_or_else(|| self.unavailable(reason))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_rules_need_an_issuer_audiences_and_https() {
        let r = JwtRule::parse(
            r#"{"issuer": "https://idp.example", "jwks_uri": "https://idp.example/keys", "audiences": ["istio-ca"]}"#,
        )
        .unwrap();
        assert_eq!(r.jwks_uri, "https://idp.example/keys");
        assert_eq!(r.audiences(), ["istio-ca"]);
        // jwksUri (proto JSON) is accepted too; without a jwks_uri the issuer is discovered.
        assert!(
            JwtRule::parse(
                r#"{"issuer": "https://idp.example", "jwksUri": "https://k/x", "audiences": ["a"]}"#
            )
            .is_ok()
        );
        assert!(JwtRule::parse(r#"{"issuer": "https://idp.example", "audiences": ["a"]}"#).is_ok());
        for (bad, why) in [
            (
                r#"{"issuer": "", "audiences": ["a"]}"#,
                "\"issuer\" is empty",
            ),
            (
                r#"{"issuer": "https://i", "jwks_uri": "https://k"}"#,
                "\"audiences\" needs at least one audience",
            ),
            (
                r#"{"issuer": "https://i", "jwks_uri": "http://k/jwks", "audiences": ["a"]}"#,
                "is not an https:// URL",
            ),
            (
                r#"{"issuer": "issuer-name", "audiences": ["a"]}"#,
                "(used for OIDC discovery) \"issuer-name\" is not an https:// URL",
            ),
            ("[]", "not a JWT rule like"),
        ] {
            let e = JwtRule::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn without_keys_a_failed_fetch_is_retried_only_after_a_pause() {
        let now = ::time::OffsetDateTime::now_utc();
        let root = crate::ca::generate::self_signed_root(
            &crate::ca::generate::CaSpec {
                organization: None,
                common_name: Some("test".into()),
                locality: None,
                not_before: now,
                not_after: now + ::time::Duration::hours(1),
                path_len: None,
                dns_sans: Vec::new(),
            },
            crate::ca::generate::generate_key(crate::ca::generate::KeyChoice::P256).unwrap(),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, &root.cert_pem).unwrap();
        // Port 1 on loopback: connection refused.
        let rule = JwtRule::parse(
            r#"{"issuer": "https://127.0.0.1:1", "jwks_uri": "https://127.0.0.1:1/keys", "audiences": ["a"]}"#,
        )
        .unwrap();
        let jwks = RemoteJwks::new(rule, Some(&ca)).unwrap();
        let first = jwks.fetch(None).await.unwrap_err();
        assert!(first.is_transient(), "{first}");
        assert_eq!(jwks.fetches(), 1);
        let second = jwks.fetch(Some("kid")).await.unwrap_err();
        assert!(
            second
                .to_string()
                .contains("the last fetch failed; retrying at most every 1s"),
            "{second}"
        );
        assert_eq!(jwks.fetches(), 1, "no second download within the pause");
        assert!(jwks.snapshot().is_none() && jwks.stale());
    }
}
