//! Bearer JWTs of one issuer: RS256 and ES256, with `iss`, `aud`, `exp` and
//! `nbf` validated, and a Kubernetes service-account `sub` turned into
//! `spiffe://<td>/ns/<ns>/sa/<sa>`. The keys come from a [`KeySource`]: a
//! local JWKS file (`--jwks-file`) or an HTTPS JWKS endpoint (`--jwt-rule`,
//! see [`crate::authn::jwks`]); verification is the same for both.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde::Deserialize;

use crate::authn::token_cache::TokenCache;
use crate::authn::{Authenticator, AuthnError, Caller, RequestContext, ServiceAccount};
use crate::identity::{Identity, SpiffeId, TrustDomain};
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
    #[error("verification keys from {source_} are unavailable: {reason}")]
    KeysUnavailable { source_: String, reason: String },
}

impl JwtError {
    /// The keys could not be fetched: the client should retry (UNAVAILABLE).
    pub fn is_transient(&self) -> bool {
        matches!(self, JwtError::KeysUnavailable { .. })
    }
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

/// One verification key of a JWKS.
struct Key {
    kid: Option<String>,
    key: DecodingKey,
}

/// The usable keys of a JWKS document (RSA and EC P-256; others are skipped).
pub struct KeySet {
    keys: Vec<Key>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self
            .keys
            .iter()
            .map(|k| k.kid.as_deref().unwrap_or("-"))
            .collect();
        f.debug_struct("KeySet").field("kids", &kids).finish()
    }
}

impl KeySet {
    /// `None` when the set holds no usable key.
    pub fn from_jwks(set: &JwkSet) -> Option<Self> {
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
        (!keys.is_empty()).then_some(KeySet { keys })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    /// The keys a token with `kid` may be signed with.
    fn candidates(&self, kid: Option<&str>) -> Result<Vec<&Key>, JwtError> {
        match kid {
            Some(kid) => {
                let found: Vec<&Key> = self
                    .keys
                    .iter()
                    .filter(|k| k.kid.as_deref() == Some(kid))
                    .collect();
                if found.is_empty() {
                    return Err(JwtError::UnknownKid(kid.to_string()));
                }
                Ok(found)
            }
            None => Ok(self.keys.iter().collect()),
        }
    }
}

/// Where an issuer's verification keys come from: a file read once at start
/// ([`StaticKeys`]) or an HTTPS JWKS endpoint ([`crate::authn::jwks::RemoteJwks`]).
#[tonic::async_trait]
pub trait KeySource: Send + Sync {
    /// For logs: where the keys come from.
    fn describe(&self) -> String;

    /// The keys at hand, without fetching; `None` before a first fetch.
    fn snapshot(&self) -> Option<Arc<KeySet>>;

    /// Whether the snapshot should be refreshed before use.
    fn stale(&self) -> bool {
        false
    }

    /// Keys that may hold `kid` (a token's key id unknown to the snapshot, or
    /// `None` when the snapshot is missing or stale). Remote sources refetch,
    /// rate-limited; static ones return what they have.
    async fn fetch(&self, kid: Option<&str>) -> Result<Arc<KeySet>, JwtError>;
}

/// Keys fixed at start (`--jwks-file`).
pub struct StaticKeys {
    origin: String,
    keys: Arc<KeySet>,
}

#[tonic::async_trait]
impl KeySource for StaticKeys {
    fn describe(&self) -> String {
        self.origin.clone()
    }

    fn snapshot(&self) -> Option<Arc<KeySet>> {
        Some(self.keys.clone())
    }

    async fn fetch(&self, _kid: Option<&str>) -> Result<Arc<KeySet>, JwtError> {
        Ok(self.keys.clone())
    }
}

/// Verifies bearer tokens of one issuer against the keys of a [`KeySource`].
pub struct JwtAuthenticator {
    issuer: String,
    audiences: Vec<String>,
    source: Arc<dyn KeySource>,
    trust_domain: TrustDomain,
    name: &'static str,
    /// Identities of verified tokens until they expire.
    cache: TokenCache<SpiffeId>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
}

/// Reads a JWKS file (bounded) into a key set.
pub fn read_jwks_file(path: &Path) -> Result<KeySet, JwksError> {
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
    KeySet::from_jwks(&set).ok_or(JwksError::NoKeys { file })
}

impl JwtAuthenticator {
    pub fn from_jwks_file(
        path: &Path,
        issuer: String,
        audiences: Vec<String>,
        trust_domain: TrustDomain,
    ) -> Result<Self, JwksError> {
        check_crypto_provider()?;
        let keys = read_jwks_file(path)?;
        let source = StaticKeys {
            origin: format!("JWKS file {}", path.display()),
            keys: Arc::new(keys),
        };
        Ok(Self::with_source(
            Arc::new(source),
            "JWT (JWKS file)",
            issuer,
            audiences,
            trust_domain,
        ))
    }

    pub fn from_jwks(
        set: &JwkSet,
        issuer: String,
        audiences: Vec<String>,
        trust_domain: TrustDomain,
    ) -> Result<Self, JwksError> {
        check_crypto_provider()?;
        let keys = KeySet::from_jwks(set).ok_or(JwksError::NoKeys {
            file: PathBuf::new(),
        })?;
        let source = StaticKeys {
            origin: "JWKS".into(),
            keys: Arc::new(keys),
        };
        Ok(Self::with_source(
            Arc::new(source),
            "JWT (JWKS)",
            issuer,
            audiences,
            trust_domain,
        ))
    }

    /// An authenticator for `issuer` whose keys come from `source`.
    pub fn with_source(
        source: Arc<dyn KeySource>,
        name: &'static str,
        issuer: String,
        audiences: Vec<String>,
        trust_domain: TrustDomain,
    ) -> Self {
        JwtAuthenticator {
            issuer,
            audiences,
            source,
            trust_domain,
            name,
            cache: TokenCache::default(),
        }
    }

    /// Verifies a token with the keys at hand (never fetches) and returns the
    /// workload identity it proves.
    pub fn verify(&self, token: &str) -> Result<SpiffeId, JwtError> {
        self.cached_or(token, |header| {
            let keys = self
                .source
                .snapshot()
                .ok_or_else(|| JwtError::KeysUnavailable {
                    source_: self.source.describe(),
                    reason: "no keys fetched yet".into(),
                })?;
            self.verify_with(token, header, &keys)
        })
    }

    /// Verifies a token, fetching keys when the source has none, is stale, or
    /// lacks the token's `kid`.
    pub async fn verify_async(&self, token: &str) -> Result<SpiffeId, JwtError> {
        if let Some(id) = self.cached(token)? {
            return Ok(id);
        }
        let header = self.header(token)?;
        let kid = header.kid.as_deref();
        let keys = match self.source.snapshot() {
            Some(keys) if !self.source.stale() && kid.is_none_or(|k| keys.has_kid(k)) => keys,
            _ => self.source.fetch(kid).await?,
        };
        let (id, exp) = self.verify_with(token, &header, &keys)?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        self.cache.put(
            TokenCache::<SpiffeId>::key(&self.issuer, token),
            id.clone(),
            exp,
            now,
        );
        Ok(id)
    }

    fn cached(&self, token: &str) -> Result<Option<SpiffeId>, JwtError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtError::TooLong);
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        Ok(self
            .cache
            .get(&TokenCache::<SpiffeId>::key(&self.issuer, token), now))
    }

    fn cached_or(
        &self,
        token: &str,
        verify: impl FnOnce(&jsonwebtoken::Header) -> Result<(SpiffeId, i64), JwtError>,
    ) -> Result<SpiffeId, JwtError> {
        if let Some(id) = self.cached(token)? {
            return Ok(id);
        }
        let header = self.header(token)?;
        let (id, exp) = verify(&header)?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        self.cache.put(
            TokenCache::<SpiffeId>::key(&self.issuer, token),
            id.clone(),
            exp,
            now,
        );
        Ok(id)
    }

    /// The token's header, with the algorithm allow-listed (not trusted).
    fn header(&self, token: &str) -> Result<jsonwebtoken::Header, JwtError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| JwtError::Header(e.to_string()))?;
        if !ALLOWED_ALGS.contains(&header.alg) {
            return Err(JwtError::Algorithm(format!("{:?}", header.alg)));
        }
        Ok(header)
    }

    fn verify_with(
        &self,
        token: &str,
        header: &jsonwebtoken::Header,
        keys: &KeySet,
    ) -> Result<(SpiffeId, i64), JwtError> {
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&self.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        let mut last = JwtError::Invalid("no key matched".into());
        for key in keys.candidates(header.kid.as_deref())? {
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

fn check_crypto_provider() -> Result<(), JwksError> {
    if jsonwebtoken::crypto::CryptoProvider::try_get_default().is_none() {
        return Err(JwksError::NoCryptoProvider);
    }
    Ok(())
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
        self.name
    }

    async fn authenticate(&self, ctx: &RequestContext<'_>) -> Result<Option<Caller>, AuthnError> {
        let Some(token) = bearer_token(ctx.metadata)? else {
            return Ok(None);
        };
        let id = self.verify_async(token).await?;
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
                vec![Identity::Spiffe(id)],
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
