//! Untrusted CSR bytes to a [`VerifiedCsr`]: PEM decoded, PKCS#10 parsed, the
//! self-signature checked. Only the public key and the presence of a CN are
//! used for issuance; everything else the CSR asks for is ignored.

use x509_parser::prelude::*;

use crate::ca::keys::KeyKind;
use crate::pem;

/// Largest `csr` field accepted (a 4096-bit RSA CSR is under 2 KiB).
pub const MAX_CSR_BYTES: usize = 64 * 1024;
/// Smallest RSA key accepted in a CSR.
pub const MIN_RSA_BITS: usize = 2048;
/// Largest RSA key accepted in a CSR (verification cost grows with size).
pub const MAX_RSA_BITS: usize = 8192;

/// Reasons a CSR is refused. The messages of the first three are istiod's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("certificate signing request is not properly encoded")]
    NotEncoded,
    #[error("failed to parse X.509 certificate signing request")]
    Parse,
    #[error("the certificate signing request signature does not verify: {0}")]
    Signature(String),
    #[error("certificate signing request is larger than {MAX_CSR_BYTES} bytes")]
    TooLarge,
    #[error(
        "RSA key of {bits} bits in the certificate signing request is below the {MIN_RSA_BITS}-bit minimum"
    )]
    RsaTooSmall { bits: usize },
    #[error(
        "RSA key of {bits} bits in the certificate signing request is above the {MAX_RSA_BITS}-bit maximum"
    )]
    RsaTooLarge { bits: usize },
    #[error(
        "unsupported public key in the certificate signing request (supported: RSA, ECDSA P-256/P-384, Ed25519)"
    )]
    UnsupportedKey,
}

/// A CSR whose signature proved possession of its key.
#[derive(Debug, Clone)]
pub struct VerifiedCsr {
    public_key: rcgen::SubjectPublicKeyInfo,
    key_kind: KeyKind,
    has_common_name: bool,
    uri_sans: Vec<String>,
}

impl VerifiedCsr {
    pub fn parse(csr: &str) -> Result<Self, CsrError> {
        if csr.len() > MAX_CSR_BYTES {
            return Err(CsrError::TooLarge);
        }
        let block = pem::parse_first(csr).map_err(|_| CsrError::NotEncoded)?;
        Self::from_der(&block.der)
    }

    pub fn from_der(der: &[u8]) -> Result<Self, CsrError> {
        let (rest, req) = X509CertificationRequest::from_der(der).map_err(|_| CsrError::Parse)?;
        if !rest.is_empty() {
            return Err(CsrError::Parse);
        }
        let info = &req.certification_request_info;
        let spki_raw = info.subject_pki.raw;
        let key_kind = KeyKind::from_spki(spki_raw).ok_or(CsrError::UnsupportedKey)?;
        if let KeyKind::Rsa { bits } = key_kind {
            if bits < MIN_RSA_BITS {
                return Err(CsrError::RsaTooSmall { bits });
            }
            if bits > MAX_RSA_BITS {
                return Err(CsrError::RsaTooLarge { bits });
            }
        }
        req.verify_signature()
            .map_err(|e| CsrError::Signature(e.to_string()))?;
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(spki_raw)
            .map_err(|_| CsrError::UnsupportedKey)?;
        let has_common_name = info
            .subject
            .iter_common_name()
            .any(|cn| cn.as_str().is_ok_and(|s| !s.is_empty()) || !cn.as_slice().is_empty());
        let mut uri_sans = Vec::new();
        if let Some(exts) = req.requested_extensions() {
            for ext in exts {
                if let ParsedExtension::SubjectAlternativeName(san) = ext {
                    for name in &san.general_names {
                        if let GeneralName::URI(uri) = name {
                            uri_sans.push(uri.to_string());
                        }
                    }
                }
            }
        }
        Ok(VerifiedCsr {
            public_key,
            key_kind,
            has_common_name,
            uri_sans,
        })
    }

    /// The public key the leaf will carry.
    pub fn public_key(&self) -> &rcgen::SubjectPublicKeyInfo {
        &self.public_key
    }

    pub fn key_kind(&self) -> KeyKind {
        self.key_kind
    }

    /// Whether the CSR subject carries a non-empty CN (then the leaf gets one too).
    pub fn has_common_name(&self) -> bool {
        self.has_common_name
    }

    /// URI SANs the CSR asks for. Used only by lab mode (`--insecure-trust-csr-identity`).
    pub fn requested_uri_sans(&self) -> &[String] {
        &self.uri_sans
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    fn csr_for(key: &KeyPair, cn: Option<&str>, san: Option<&str>) -> String {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        if let Some(uri) = san {
            params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
        }
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    #[test]
    fn p256_csr_is_verified_and_san_read() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = VerifiedCsr::parse(&csr_for(&key, None, Some("spiffe://td/ns/a/sa/b"))).unwrap();
        assert_eq!(csr.key_kind(), KeyKind::EcdsaP256);
        assert!(!csr.has_common_name());
        assert_eq!(csr.requested_uri_sans(), ["spiffe://td/ns/a/sa/b"]);
        use rcgen::PublicKeyData as _;
        assert_eq!(csr.public_key().der_bytes(), key.der_bytes());
    }

    #[test]
    fn ed25519_and_cn_are_read() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let csr = VerifiedCsr::parse(&csr_for(&key, Some("x"), None)).unwrap();
        assert_eq!(csr.key_kind(), KeyKind::Ed25519);
        assert!(csr.has_common_name());
    }

    #[test]
    fn istio_error_texts_for_bad_input() {
        assert_eq!(
            VerifiedCsr::parse("dumb CSR").unwrap_err().to_string(),
            "certificate signing request is not properly encoded"
        );
        let not_csr = pem::encode("CERTIFICATE REQUEST", b"\x30\x03\x02\x01\x00");
        assert_eq!(
            VerifiedCsr::parse(&not_csr).unwrap_err().to_string(),
            "failed to parse X.509 certificate signing request"
        );
        assert_eq!(
            VerifiedCsr::parse(&"x".repeat(MAX_CSR_BYTES + 1)).unwrap_err(),
            CsrError::TooLarge
        );
    }

    #[test]
    fn a_corrupted_signature_is_refused() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let block = pem::parse_first(&csr_for(&key, None, None)).unwrap();
        let mut der = block.der.clone();
        let last = der.len() - 2;
        der[last] ^= 0x01;
        assert!(matches!(
            VerifiedCsr::from_der(&der),
            Err(CsrError::Signature(_)) | Err(CsrError::Parse)
        ));
    }

    #[test]
    fn any_pem_label_is_accepted_and_trailing_text_ignored() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr =
            csr_for(&key, None, None).replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST");
        assert!(VerifiedCsr::parse(&format!("junk\n{csr}\n-----BEGIN BROKEN")).is_ok());
    }

    /// Mutation fuzzing in miniature: thousands of corrupted CSRs (bit flips,
    /// truncations, length-byte damage) must give `Ok` or `Err`, never a panic.
    #[test]
    fn corrupted_csrs_never_panic() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let good = pem::parse_first(&csr_for(&key, Some("x"), Some("spiffe://td/ns/a/sa/b")))
            .unwrap()
            .der;
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..5000 {
            let mut der = good.clone();
            match round % 3 {
                0 => {
                    let i = next() as usize % der.len();
                    der[i] ^= 1 << (next() % 8);
                }
                1 => der.truncate(next() as usize % der.len()),
                _ => {
                    let i = next() as usize % der.len();
                    der[i] = next() as u8;
                }
            }
            let _ = VerifiedCsr::from_der(&der);
            let _ = VerifiedCsr::parse(&pem::encode("CERTIFICATE REQUEST", &der));
        }
    }
}
