//! A JWT issuer for tools and tests: a generated signing key (ES256 or
//! RS256), its JWKS, and tokens with Kubernetes-style service-account
//! claims. `plugca bench`, [`crate::testing`] and the integration tests mint
//! with it; the server never does (it only verifies, in `authn::jwt`).

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use crate::ca::generate::{self, KeyChoice};

#[derive(Debug, thiserror::Error)]
pub enum JwtIssuerError {
    #[error("JWT key: {0:?} is not supported (ES256 or RS256)")]
    Unsupported(Algorithm),
    #[error("JWT key: {0}")]
    Key(String),
    #[error("signing a token failed: {0}")]
    Sign(String),
}

/// Claims of a token; `exp_in` and `nbf_in` are seconds from now (negative:
/// in the past), `iat` is now.
#[derive(Debug, Clone, Copy)]
pub struct Claims<'a> {
    pub iss: &'a str,
    pub aud: &'a str,
    pub sub: &'a str,
    pub exp_in: i64,
    pub nbf_in: i64,
}

/// A signing key, the `kid` its tokens name and the JWK a server verifies
/// them with. The key is generated here and never leaves (no `Debug`, no
/// accessor).
pub struct JwtIssuer {
    key: EncodingKey,
    alg: Algorithm,
    kid: String,
    jwk: Jwk,
}

impl JwtIssuer {
    /// A fresh P-256 (ES256) or RSA-2048 (RS256) key named `kid`.
    pub fn generate(alg: Algorithm, kid: &str) -> Result<JwtIssuer, JwtIssuerError> {
        let key = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_der(
                &generate::generate_key(KeyChoice::P256)
                    .map_err(|e| JwtIssuerError::Key(e.to_string()))?
                    .secret_key_pair()
                    .serialize_der(),
            ),
            // jsonwebtoken signs RSA from PKCS#1 DER.
            Algorithm::RS256 => {
                use rsa::pkcs1::EncodeRsaPrivateKey as _;
                let rsa = rsa::PrivateKey::new(&mut getrandom::SysRng, 2048)
                    .map_err(|e| JwtIssuerError::Key(e.to_string()))?;
                let pkcs1 = rsa
                    .to_pkcs1_der()
                    .map_err(|e| JwtIssuerError::Key(e.to_string()))?;
                EncodingKey::from_rsa_der(pkcs1.as_bytes())
            }
            _ => return Err(JwtIssuerError::Unsupported(alg)),
        };
        let mut jwk =
            Jwk::from_encoding_key(&key, alg).map_err(|e| JwtIssuerError::Key(e.to_string()))?;
        jwk.common.key_id = Some(kid.to_string());
        Ok(JwtIssuer {
            key,
            alg,
            kid: kid.to_string(),
            jwk,
        })
    }

    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK (with `kid` and `alg`).
    pub fn jwk(&self) -> &Jwk {
        &self.jwk
    }

    /// A JWKS document (`{"keys": [...]}`) with the public keys of `issuers`.
    pub fn jwks(issuers: &[&JwtIssuer]) -> String {
        let set = JwkSet {
            keys: issuers.iter().map(|i| i.jwk.clone()).collect(),
        };
        serde_json::to_string(&set).expect("a JWK set of generated keys serializes")
    }

    /// A token with `claims`, naming this issuer's `kid`.
    pub fn mint(&self, claims: &Claims) -> Result<String, JwtIssuerError> {
        self.mint_as(&self.kid, claims)
    }

    /// A token signed by this key but naming `kid` (tests of the wrong key
    /// behind a known `kid`).
    pub fn mint_as(&self, kid: &str, claims: &Claims) -> Result<String, JwtIssuerError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut header = Header::new(self.alg);
        header.kid = Some(kid.to_string());
        let body = serde_json::json!({
            "iss": claims.iss,
            "aud": [claims.aud],
            "sub": claims.sub,
            "iat": now,
            "nbf": now + claims.nbf_in,
            "exp": now + claims.exp_in,
        });
        jsonwebtoken::encode(&header, &body, &self.key)
            .map_err(|e| JwtIssuerError::Sign(e.to_string()))
    }

    /// A token for service account `ns/sa` (`system:serviceaccount:<ns>:<sa>`),
    /// valid from a minute ago for `lifetime_secs`.
    pub fn mint_service_account(
        &self,
        iss: &str,
        aud: &str,
        ns: &str,
        sa: &str,
        lifetime_secs: i64,
    ) -> Result<String, JwtIssuerError> {
        self.mint(&Claims {
            iss,
            aud,
            sub: &format!("system:serviceaccount:{ns}:{sa}"),
            exp_in: lifetime_secs,
            nbf_in: -60,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::TrustDomain;

    #[test]
    fn minted_tokens_verify_with_the_jwks_for_both_algorithms() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::parse("cluster.local").unwrap();
        for alg in [Algorithm::RS256, Algorithm::ES256] {
            let issuer = JwtIssuer::generate(alg, "k1").unwrap();
            let path = dir.path().join(format!("{alg:?}.json"));
            std::fs::write(&path, JwtIssuer::jwks(&[&issuer])).unwrap();
            let authn = crate::authn::jwt::JwtAuthenticator::from_jwks_file(
                &path,
                "https://iss".into(),
                vec!["aud".into()],
                td.clone(),
            )
            .unwrap();
            let token = issuer
                .mint_service_account("https://iss", "aud", "ns", "sa", 60)
                .unwrap();
            let id = authn.verify(&token).unwrap();
            assert_eq!(id.to_string(), "spiffe://cluster.local/ns/ns/sa/sa");
        }
    }

    #[test]
    fn only_es256_and_rs256_keys_are_generated() {
        assert!(matches!(
            JwtIssuer::generate(Algorithm::HS256, "k"),
            Err(JwtIssuerError::Unsupported(Algorithm::HS256))
        ));
    }
}
