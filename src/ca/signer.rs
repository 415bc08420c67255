//! Issuing workload certificates with the CA key: the leaf profile is ours
//! (spec section 6); only the public key comes from the request.

use ::time::OffsetDateTime;
use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose, PublicKeyData, SerialNumber, SigningKey,
};
use ring::rand::SecureRandom as _;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::*;

use crate::asn1::{self, GeneralName};
use crate::authn::Caller;
use crate::ca::cert::Cert;
use crate::ca::keys::{CaKey, KeyKind};
use crate::csr::VerifiedCsr;

/// subjectAltName (2.5.29.17).
const OID_SAN: &[u64] = &[2, 5, 29, 17];
/// basicConstraints (2.5.29.19).
const OID_BASIC_CONSTRAINTS: &[u64] = &[2, 5, 29, 19];

fn is_rsa(alg: &rcgen::SignatureAlgorithm) -> bool {
    [
        &rcgen::PKCS_RSA_SHA256,
        &rcgen::PKCS_RSA_SHA384,
        &rcgen::PKCS_RSA_SHA512,
    ]
    .contains(&alg)
}

/// Longest CN Istio puts in a leaf subject (X.520 ub-common-name).
pub const MAX_CN_LEN: usize = 64;

impl PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        self.secret_key_pair().der_bytes()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.secret_key_pair().algorithm()
    }
}

impl SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.secret_key_pair().sign(msg)
    }
}

/// What a leaf certificate is issued for: a workload leaf from an
/// authenticated caller and a verified CSR, or the server's own serving leaf.
pub struct LeafSpec<'a> {
    public_key: &'a dyn PublicKeyData,
    sans: Vec<GeneralName>,
    /// Set when the CSR asked for a CN: Istio then puts the first identity there.
    common_name: Option<String>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

impl<'a> LeafSpec<'a> {
    /// A workload leaf: the CSR's public key, the caller's identities as SANs,
    /// valid from `window.0` to `window.1`. The CSR's own SANs are ignored.
    pub fn workload(
        caller: &Caller,
        csr: &'a VerifiedCsr,
        window: (OffsetDateTime, OffsetDateTime),
    ) -> Self {
        // Istio: CN = the first identity when the CSR asked for a CN, if it fits.
        let common_name = csr
            .has_common_name()
            .then(|| caller.identities().first().map(ToString::to_string))
            .flatten()
            .filter(|cn| cn.len() <= MAX_CN_LEN);
        LeafSpec {
            public_key: csr.public_key(),
            sans: caller.sans(),
            common_name,
            not_before: window.0,
            not_after: window.1,
        }
    }

    /// The gRPC listener's own certificate (and the signer's self-test probe).
    pub(crate) fn serving(
        public_key: &'a dyn PublicKeyData,
        sans: Vec<GeneralName>,
        window: (OffsetDateTime, OffsetDateTime),
    ) -> Self {
        LeafSpec {
            public_key,
            sans,
            common_name: None,
            not_before: window.0,
            not_after: window.1,
        }
    }

    /// The same leaf for a key the requester does not hold (the `wrong-key`
    /// test-harness fault).
    pub(crate) fn with_foreign_key(self, public_key: &'a dyn PublicKeyData) -> Self {
        LeafSpec { public_key, ..self }
    }

    pub fn sans(&self) -> &[GeneralName] {
        &self.sans
    }
}

/// An issued leaf.
#[derive(Debug, Clone)]
pub struct IssuedLeaf {
    pub der: Vec<u8>,
    pub pem: String,
    pub serial_hex: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("failed to generate a random serial number")]
    Random,
    #[error("failed to sign the certificate: {0}")]
    Rcgen(String),
}

/// The signing half of a bundle: the CA key and the issuer name/key id.
pub struct Signer {
    issuer: Issuer<'static, CaKey>,
    key_kind: KeyKind,
    key_id_hex: String,
    rng: ring::rand::SystemRandom,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_kind", &self.key_kind)
            .field("key_id", &self.key_id_hex)
            .field("key", &"[elided]")
            .finish()
    }
}

impl Signer {
    /// Prepares signing with `key` as `signing`, and proves it works: a probe
    /// leaf must carry the CA subject byte for byte and verify with the CA key.
    pub fn new(signing: &Cert, key: CaKey) -> Result<Self, String> {
        let (_, x509) = X509Certificate::from_der(&signing.der)
            .map_err(|e| format!("cannot parse the signing certificate: {e}"))?;
        for rdn in x509.subject().iter() {
            if rdn.iter().count() != 1 {
                return Err(
                    "the signing certificate subject has a multi-valued or empty RDN, which plugca cannot copy into leaf issuer names"
                        .into(),
                );
            }
        }
        let key_kind = key.kind();
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(signing.der.as_slice()), key)
            .map_err(|e| format!("cannot use the signing certificate as issuer: {e}"))?;
        let key_id_hex = signing
            .ski
            .as_deref()
            .map(hex)
            .unwrap_or_else(|| "(derived from the CA public key)".into());
        let signer = Signer {
            issuer,
            key_kind,
            key_id_hex,
            rng: ring::rand::SystemRandom::new(),
        };
        signer.self_test(signing)?;
        Ok(signer)
    }

    pub fn key_kind(&self) -> KeyKind {
        self.key_kind
    }

    /// The CA key, for re-signing a self-signed root with the same key.
    pub fn secret_key(&self) -> &CaKey {
        self.issuer.key()
    }

    /// The public key of the CA key (to tell keys apart on reload).
    pub fn public_key_bits(&self) -> &[u8] {
        self.issuer.key().public_key_bits()
    }

    /// The CA's key identifier as hex (for audit logs).
    pub fn key_id_hex(&self) -> &str {
        &self.key_id_hex
    }

    pub fn issue(&self, spec: &LeafSpec<'_>) -> Result<IssuedLeaf, SignError> {
        let mut serial = [0u8; 16];
        self.rng.fill(&mut serial).map_err(|_| SignError::Random)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if let Some(cn) = &spec.common_name {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        // istiod sets keyEncipherment for every key type; RFC 5480/8813 prohibit it
        // for EC keys (pkilint flags it), and TLS with EC keys never uses it.
        params.key_usages = if is_rsa(spec.public_key.algorithm()) {
            vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ]
        } else {
            vec![KeyUsagePurpose::DigitalSignature]
        };
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        // Like istiod: critical CA:FALSE and no SKI on leaves (rcgen's
        // ExplicitNoCa would add an SKI).
        params.is_ca = IsCa::NoCa;
        params.use_authority_key_identifier_extension = true;
        // Istio marks the SAN critical even when a CN is present; rcgen would not.
        let mut san = CustomExtension::from_oid_content(OID_SAN, asn1::general_names(&spec.sans));
        san.set_criticality(true);
        let mut basic_constraints =
            CustomExtension::from_oid_content(OID_BASIC_CONSTRAINTS, vec![0x30, 0x00]);
        basic_constraints.set_criticality(true);
        params.custom_extensions = vec![basic_constraints, san];
        let cert = params
            .signed_by(&spec.public_key, &self.issuer)
            .map_err(|e| SignError::Rcgen(e.to_string()))?;
        let der = cert.der().to_vec();
        Ok(IssuedLeaf {
            pem: crate::pem::encode("CERTIFICATE", &der),
            der,
            serial_hex: hex(&serial),
        })
    }

    fn self_test(&self, signing: &Cert) -> Result<(), String> {
        let probe_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| format!("self-test key: {e}"))?;
        let now = OffsetDateTime::now_utc();
        let leaf = self
            .issue(&LeafSpec::serving(
                &probe_key,
                vec![GeneralName::Uri("spiffe://plugca.invalid/self-test".into())],
                (now, now + ::time::Duration::minutes(1)),
            ))
            .map_err(|e| format!("self-test signing failed: {e}"))?;
        let (_, probe) =
            X509Certificate::from_der(&leaf.der).map_err(|e| format!("self-test leaf: {e}"))?;
        if probe.issuer().as_raw() != signing.subject_raw.as_slice() {
            return Err(
                "leaf issuer names would not match the signing certificate subject byte for byte"
                    .into(),
            );
        }
        let (_, ca) = X509Certificate::from_der(&signing.der).map_err(|e| e.to_string())?;
        probe.verify_signature(Some(ca.public_key())).map_err(|_| {
            "a leaf signed with the key does not verify with the certificate's public key"
                .to_string()
        })
    }
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}
