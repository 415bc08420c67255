//! Renewal over mTLS: a client certificate that chains to our roots (checked by
//! the TLS layer) and carries exactly one SPIFFE URI SAN in our trust domain.

use x509_parser::prelude::*;

use crate::authn::{Authenticator, AuthnError, Caller, RequestContext};
use crate::identity::{Identity, SpiffeId, TrustDomain};
use crate::metrics::AuthnKind;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientCertError {
    #[error("the client certificate cannot be parsed")]
    Parse,
    #[error("the SAN extension does not exist")]
    NoSan,
    #[error("the client certificate has {0} URI SANs; exactly one SPIFFE ID is required")]
    UriCount(usize),
    #[error("the client certificate URI SAN is not a valid SPIFFE ID: {0}")]
    NotSpiffe(String),
    #[error("the client certificate identity {id} is in trust domain {found:?}, not {expected:?}")]
    WrongTrustDomain {
        id: String,
        found: String,
        expected: String,
    },
}

pub struct ClientCertAuthenticator {
    trust_domain: TrustDomain,
}

impl ClientCertAuthenticator {
    pub fn new(trust_domain: TrustDomain) -> Self {
        ClientCertAuthenticator { trust_domain }
    }

    /// The identity a verified client leaf proves.
    pub fn identity_of(&self, leaf_der: &[u8]) -> Result<(SpiffeId, String), ClientCertError> {
        let (_, cert) = X509Certificate::from_der(leaf_der).map_err(|_| ClientCertError::Parse)?;
        let san = cert
            .subject_alternative_name()
            .map_err(|_| ClientCertError::Parse)?
            .ok_or(ClientCertError::NoSan)?;
        let uris: Vec<&str> = san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect();
        let [uri] = uris.as_slice() else {
            return Err(ClientCertError::UriCount(uris.len()));
        };
        let id = SpiffeId::parse(uri).map_err(|e| ClientCertError::NotSpiffe(e.to_string()))?;
        if id.trust_domain() != self.trust_domain.as_str() {
            return Err(ClientCertError::WrongTrustDomain {
                id: id.to_string(),
                found: id.trust_domain().to_string(),
                expected: self.trust_domain.to_string(),
            });
        }
        Ok((id, cert.raw_serial_as_string()))
    }
}

#[tonic::async_trait]
impl Authenticator for ClientCertAuthenticator {
    fn name(&self) -> &'static str {
        "client certificate"
    }

    async fn authenticate(&self, ctx: &RequestContext<'_>) -> Result<Option<Caller>, AuthnError> {
        let Some(leaf) = ctx.peer_certs.and_then(|c| c.first()) else {
            return Ok(None);
        };
        let (id, serial) = self.identity_of(leaf)?;
        Ok(Some(Caller::new(
            vec![Identity::Spiffe(id)],
            AuthnKind::client_cert,
            format!("client certificate serial {serial}"),
        )))
    }
}
