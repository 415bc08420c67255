//! Bearer JWTs checked against a local JWKS file (`--jwks-file`): RS256 and
//! ES256, with `iss`, `aud`, `exp` and `nbf` validated, and a Kubernetes
//! service-account `sub` turned into `spiffe://<td>/ns/<ns>/sa/<sa>`.

use std::path::{Path, PathBuf};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde::Deserialize;

use crate::authn::{Authenticator, AuthnError, Caller, RequestContext, ServiceAccount};
use crate::identity::{SpiffeId, TrustDomain};
use crate::metrics::AuthnKind;

/// Largest bearer token accepted.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Largest JWKS file read.
pub const MAX_JWKS_BYTES: u64 = 1024 * 1024;
const ALLOWED_ALGS: [Algorithm; 2] = [Algorithm::RS256, Algorithm::ES256];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("no bearer token exists in HTTP authorization header")]
    NoBearer,
    #[error("the bearer token is longer than {MAX_TOKEN_BYTES} bytes")]
    TooLong,
    #[error("malformed token header: {0}")]
    Header(String),
    #[error("token algorithm {0:?} is not allowed (RS256 and ES256 are)")]
    Algorithm(String),
    #[error("no key with kid {0:?} in the JWKS")]
    UnknownKid(String),
    #[error("token rejected: {0}")]
    Invalid(String),
    #[error("token subject {0:?} is not system:serviceaccount:<namespace>:<name>")]
    Subject(String),
    #[error("token subject names an invalid identity: {0}")]
    Identity(String),
}

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("{file}: cannot read: {reason}")]
    Read { file: PathBuf, reason: String },
    #[error("{file}: larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge { file: PathBuf },
    #[error("{file}: not a JWKS document: {reason}")]
    Parse { file: PathBuf, reason: String },
    #[error("{file}: no usable RSA or EC P-256 key")]
    NoKeys { file: PathBuf },
    #[error("no JWT crypto provider is compiled in")]
    NoCryptoProvider,
}

struct Key {
    kid: Option<String>,
    key: DecodingKey,
}

/// Verifies bearer tokens issued by one issuer whose keys are in a JWKS file.
pub struct JwtAuthenticator {
    issuer: String,
    audiences: Vec<String>,
    keys: Vec<Key>,
    trust_domain: TrustDomain,
    cache: VerifiedCache,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
}

/// Most verified tokens remembered.
pub const TOKEN_CACHE_CAPACITY: usize = 16_384;

/// Identities of recently verified tokens until they expire, keyed by the
/// SHA-256 of the token (tokens themselves are never stored), so a renewal
/// storm with the same tokens costs one signature check per token.
#[derive(Default)]
struct VerifiedCache {
    entries: std::sync::Mutex<std::collections::HashMap<[u8; 32], (SpiffeId, i64)>>,
}

impl VerifiedCache {
    fn key(token: &str) -> [u8; 32] {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut k = [0u8; 32];
        k.copy_from_slice(digest.as_ref());
        k
    }

    fn get(&self, key: &[u8; 32], now: i64) -> Option<SpiffeId> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(key)
            .filter(|(_, exp)| *exp > now)
            .map(|(id, _)| id.clone())
    }

    fn put(&self, key: [u8; 32], id: SpiffeId, exp: i64, now: i64) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= TOKEN_CACHE_CAPACITY {
            entries.retain(|_, (_, e)| *e > now);
            if entries.len() >= TOKEN_CACHE_CAPACITY {
                entries.clear();
            }
        }
        entries.insert(key, (id, exp));
    }
}

impl JwtAuthenticator {
    pub fn from_jwks_file(
        path: &Path,
        issuer: String,
        audiences: Vec<String>,
        trust_domain: TrustDomain,
    ) -> Result<Self, JwksError> {
        use std::io::Read as _;
        let file = path.to_path_buf();
        let read_err = |e: std::io::Error| JwksError::Read {
            file: file.clone(),
            reason: e.to_string(),
        };
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .map_err(read_err)?
            .take(MAX_JWKS_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_JWKS_BYTES {
            return Err(JwksError::TooLarge { file });
        }
        let set: JwkSet = serde_json::from_slice(&bytes).map_err(|e| JwksError::Parse {
            file: file.clone(),
            reason: e.to_string(),
        })?;
        Self::from_jwks(&set, issuer, audiences, trust_domain).map_err(|e| match e {
            JwksError::NoKeys { .. } => JwksError::NoKeys { file },
            other => other,
        })
    }

    pub fn from_jwks(
        set: &JwkSet,
        issuer: String,
        audiences: Vec<String>,
        trust_domain: TrustDomain,
    ) -> Result<Self, JwksError> {
        if jsonwebtoken::crypto::CryptoProvider::try_get_default().is_none() {
            return Err(JwksError::NoCryptoProvider);
        }
        let keys: Vec<Key> = set
            .keys
            .iter()
            .filter_map(|jwk| {
                let key = DecodingKey::from_jwk(jwk).ok()?;
                Some(Key {
                    kid: jwk.common.key_id.clone(),
                    key,
                })
            })
            .collect();
        if keys.is_empty() {
            return Err(JwksError::NoKeys {
                file: PathBuf::new(),
            });
        }
        Ok(JwtAuthenticator {
            issuer,
            audiences,
            keys,
            trust_domain,
            cache: VerifiedCache::default(),
        })
    }

    /// Verifies a token and returns the workload identity it proves.
    pub fn verify(&self, token: &str) -> Result<SpiffeId, JwtError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtError::TooLong);
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let cache_key = VerifiedCache::key(token);
        if let Some(id) = self.cache.get(&cache_key, now) {
            return Ok(id);
        }
        let (id, exp) = self.verify_uncached(token)?;
        self.cache.put(cache_key, id.clone(), exp, now);
        Ok(id)
    }

    fn verify_uncached(&self, token: &str) -> Result<(SpiffeId, i64), JwtError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| JwtError::Header(e.to_string()))?;
        if !ALLOWED_ALGS.contains(&header.alg) {
            return Err(JwtError::Algorithm(format!("{:?}", header.alg)));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&self.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        let candidates: Vec<&Key> = match &header.kid {
            Some(kid) => {
                let found: Vec<&Key> = self
                    .keys
                    .iter()
                    .filter(|k| k.kid.as_deref() == Some(kid))
                    .collect();
                if found.is_empty() {
                    return Err(JwtError::UnknownKid(kid.clone()));
                }
                found
            }
            None => self.keys.iter().collect(),
        };
        let mut last = JwtError::Invalid("no key matched".into());
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => return Ok((self.identity(&data.claims.sub)?, data.claims.exp)),
                Err(e) => last = JwtError::Invalid(format!("{:?}", e.kind())),
            }
        }
        Err(last)
    }

    fn identity(&self, sub: &str) -> Result<SpiffeId, JwtError> {
        let parts: Vec<&str> = sub.split(':').collect();
        let ["system", "serviceaccount", ns, sa] = parts.as_slice() else {
            return Err(JwtError::Subject(sub.to_string()));
        };
        SpiffeId::workload(&self.trust_domain, ns, sa)
            .map_err(|e| JwtError::Identity(e.to_string()))
    }
}

/// The first `authorization: Bearer <token>` value. `Ok(None)` when there is no
/// authorization header at all.
pub fn bearer_token(metadata: &tonic::metadata::MetadataMap) -> Result<Option<&str>, JwtError> {
    let mut saw_header = false;
    for value in metadata.get_all("authorization") {
        saw_header = true;
        if let Some(token) = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) {
            return Ok(Some(token));
        }
    }
    if saw_header {
        Err(JwtError::NoBearer)
    } else {
        Ok(None)
    }
}

#[tonic::async_trait]
impl Authenticator for JwtAuthenticator {
    fn name(&self) -> &'static str {
        "JWT (JWKS file)"
    }

    async fn authenticate(&self, ctx: &RequestContext<'_>) -> Result<Option<Caller>, AuthnError> {
        let Some(token) = bearer_token(ctx.metadata)? else {
            return Ok(None);
        };
        let id = self.verify(token)?;
        let (namespace, name) = id
            .namespace_and_service_account()
            .expect("identity() builds /ns/<ns>/sa/<sa> IDs");
        let service_account = ServiceAccount {
            namespace: namespace.to_string(),
            name: name.to_string(),
            pod: None,
            cluster_id: None,
        };
        Ok(Some(
            Caller::new(
                vec![id.to_string()],
                AuthnKind::jwt,
                format!("JWT from issuer {}", self.issuer),
            )
            .with_service_account(service_account),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: usize) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://td/ns/a/sa/s{n}")).unwrap()
    }

    #[test]
    fn cached_identities_expire_with_their_token() {
        let cache = VerifiedCache::default();
        let k = VerifiedCache::key("token");
        cache.put(k, id(1), 100, 50);
        assert_eq!(cache.get(&k, 99), Some(id(1)));
        assert_eq!(cache.get(&k, 100), None, "expired at exp");
        assert_eq!(cache.get(&VerifiedCache::key("other"), 50), None);
    }

    #[test]
    fn the_cache_stays_bounded() {
        let cache = VerifiedCache::default();
        for n in 0..TOKEN_CACHE_CAPACITY + 10 {
            cache.put(VerifiedCache::key(&n.to_string()), id(n), 1000, 0);
        }
        let len = cache.entries.lock().unwrap().len();
        assert!(len <= TOKEN_CACHE_CAPACITY, "{len}");
    }

    #[test]
    fn subjects_must_be_kubernetes_service_accounts() {
        let set: JwkSet = serde_json::from_str(r#"{"keys":[{"kty":"EC","crv":"P-256","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM","kid":"k"}]}"#).unwrap();
        let a = JwtAuthenticator::from_jwks(
            &set,
            "iss".into(),
            vec!["aud".into()],
            TrustDomain::parse("td").unwrap(),
        )
        .unwrap();
        assert_eq!(
            a.identity("system:serviceaccount:ns:sa").unwrap().as_str(),
            "spiffe://td/ns/ns/sa/sa"
        );
        for bad in [
            "system:serviceaccount:ns",
            "user:alice",
            "system:serviceaccount:ns:sa:x",
            "system:serviceaccount::sa",
            "system:serviceaccount:ns/x:sa",
        ] {
            assert!(a.identity(bad).is_err(), "{bad}");
        }
    }
}
