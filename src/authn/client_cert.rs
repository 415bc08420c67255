//! Renewal over mTLS: a client certificate that chains to our roots and
//! carries exactly one SPIFFE URI SAN in our trust domain.
//!
//! The TLS layer checks the chain once, at the handshake, against the roots of
//! that moment. A connection can outlive both the certificate and a root
//! removed by rotation, so every request checks the chain again here, with
//! webpki, against the roots of the bundle serving now, at the current time.
//! The outcome of a successful check is remembered for that exact chain (the
//! DER bytes), that bundle and the chain's validity window, so a client that
//! sends many requests with one certificate pays the signature checks once;
//! a new bundle (reload, rotation) or the end of the window checks again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use x509_parser::prelude::*;

use crate::authn::{Authenticator, AuthnError, Caller, RequestContext};
use crate::ca::CaBundle;
use crate::ca::Current;
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
    #[error("no CA bundle is loaded to verify the client certificate against")]
    NoCa,
    #[error("the client certificate chain does not verify against the current roots: {0}")]
    Chain(webpki::Error),
}

pub struct ClientCertAuthenticator {
    trust_domain: TrustDomain,
    ca: Arc<Current>,
    /// Trust anchors of the last bundle seen, rebuilt when the bundle changes.
    anchors: Mutex<Option<(Arc<CaBundle>, Anchors)>>,
    /// Chains that verified, against which bundle, until when.
    verified: Mutex<Verified>,
}

/// Chains verified against one bundle. Bounded: when full it starts over.
#[derive(Default)]
struct Verified {
    bundle: Option<Arc<CaBundle>>,
    /// By leaf DER.
    chains: HashMap<Vec<u8>, VerifiedChain>,
}

/// Remembered verified chains, at most (each holds a copy of its chain, ~2 KB).
const VERIFIED_CHAINS_MAX: usize = 1024;

struct VerifiedChain {
    /// The certificates after the leaf, as the client sent them.
    rest: Vec<Vec<u8>>,
    /// Unix seconds: the latest NotBefore and the earliest NotAfter of the chain.
    from: u64,
    until: u64,
    caller: Caller,
}

type Anchors = Arc<Vec<TrustAnchor<'static>>>;

impl ClientCertAuthenticator {
    pub fn new(trust_domain: TrustDomain, ca: Arc<Current>) -> Self {
        ClientCertAuthenticator {
            trust_domain,
            ca,
            anchors: Mutex::new(None),
            verified: Mutex::new(Verified::default()),
        }
    }

    /// The caller of a chain verified before against the bundle serving now,
    /// while `now` is inside the chain's validity window.
    fn remembered(&self, chain: &[CertificateDer<'static>], now: UnixTime) -> Option<Caller> {
        let bundle = self.ca.current()?;
        let [leaf, rest @ ..] = chain else {
            return None;
        };
        let verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if !verified
            .bundle
            .as_ref()
            .is_some_and(|b| Arc::ptr_eq(b, &bundle))
        {
            return None;
        }
        let hit = verified.chains.get(leaf.as_ref())?;
        let now = now.as_secs();
        let same_rest = hit.rest.len() == rest.len()
            && hit
                .rest
                .iter()
                .zip(rest)
                .all(|(a, b)| a.as_slice() == b.as_ref());
        (same_rest && hit.from <= now && now < hit.until).then(|| hit.caller.clone())
    }

    /// Remembers a chain that just verified against `bundle`.
    fn remember(&self, bundle: Arc<CaBundle>, chain: &[CertificateDer<'static>], caller: &Caller) {
        let [leaf, rest @ ..] = chain else {
            return;
        };
        let Some((from, until)) = validity_window(chain) else {
            return;
        };
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if !verified
            .bundle
            .as_ref()
            .is_some_and(|b| Arc::ptr_eq(b, &bundle))
            || verified.chains.len() >= VERIFIED_CHAINS_MAX
        {
            verified.chains.clear();
            verified.bundle = Some(bundle);
        }
        verified.chains.insert(
            leaf.to_vec(),
            VerifiedChain {
                rest: rest.iter().map(|c| c.to_vec()).collect(),
                from,
                until,
                caller: caller.clone(),
            },
        );
    }

    /// Checks `chain` (leaf first) against the current bundle's roots at `now`
    /// for client authentication.
    pub fn verify_chain(
        &self,
        chain: &[CertificateDer<'static>],
        now: UnixTime,
    ) -> Result<(), ClientCertError> {
        let [leaf, intermediates @ ..] = chain else {
            return Err(ClientCertError::Parse);
        };
        let anchors = self.current_anchors()?;
        let leaf = webpki::EndEntityCert::try_from(leaf).map_err(|_| ClientCertError::Parse)?;
        leaf.verify_for_usage(
            crate::tls::crypto_provider()
                .signature_verification_algorithms
                .all,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map(|_| ())
        .map_err(ClientCertError::Chain)
    }

    fn current_anchors(&self) -> Result<Anchors, ClientCertError> {
        let bundle = self.ca.current().ok_or(ClientCertError::NoCa)?;
        let mut cached = self.anchors.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((seen, anchors)) = cached.as_ref()
            && Arc::ptr_eq(seen, &bundle)
        {
            return Ok(anchors.clone());
        }
        // Roots were parsed and checked when the bundle loaded; one that webpki
        // cannot use as an anchor simply anchors nothing.
        let anchors: Vec<TrustAnchor<'static>> = bundle
            .roots()
            .iter()
            .filter_map(|r| {
                webpki::anchor_from_trusted_cert(&CertificateDer::from(r.der.as_slice()))
                    .ok()
                    .map(|a| a.to_owned())
            })
            .collect();
        let anchors = Arc::new(anchors);
        *cached = Some((bundle, anchors.clone()));
        Ok(anchors)
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
        let Some(chain) = ctx.peer_certs.filter(|c| !c.is_empty()) else {
            return Ok(None);
        };
        let now = UnixTime::now();
        if let Some(caller) = self.remembered(chain, now) {
            return Ok(Some(caller));
        }
        // The bundle the chain is checked against, for `remember`.
        let bundle = self.ca.current();
        self.verify_chain(chain, now)?;
        let (id, serial) = self.identity_of(&chain[0])?;
        let caller = Caller::new(
            vec![Identity::Spiffe(id)],
            AuthnKind::client_cert,
            format!("client certificate serial {serial}"),
        );
        if let Some(bundle) = bundle {
            self.remember(bundle, chain, &caller);
        }
        Ok(Some(caller))
    }
}

/// Unix seconds from the latest NotBefore to the earliest NotAfter of the
/// certificates in `chain`; `None` when one does not parse or the window is empty.
fn validity_window(chain: &[CertificateDer<'static>]) -> Option<(u64, u64)> {
    let mut from = 0u64;
    let mut until = u64::MAX;
    for cert in chain {
        let (_, cert) = X509Certificate::from_der(cert.as_ref()).ok()?;
        let v = cert.validity();
        from = from.max(u64::try_from(v.not_before.timestamp()).unwrap_or(0));
        until = until.min(u64::try_from(v.not_after.timestamp()).ok()?);
    }
    (from < until).then_some((from, until))
}
