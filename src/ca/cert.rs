//! A certificate as the bundle keeps it: DER, the original PEM text, where it
//! came from, and the facts the load checks and reports need.

use ::time::OffsetDateTime;
use x509_parser::prelude::*;

use crate::ca::keys::KeyKind;

/// Where a certificate was read from (file name and block index) for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: String,
    pub index: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.index == 0 {
            f.write_str(&self.file)
        } else {
            write!(f, "{} (certificate {})", self.file, self.index + 1)
        }
    }
}

/// A parsed certificate plus its source. Parsed facts are extracted once.
#[derive(Debug, Clone)]
pub struct Cert {
    pub der: Vec<u8>,
    /// The PEM block as written in the file, `BEGIN` to `END`, no trailing newline.
    pub text: String,
    pub origin: Origin,
    pub subject: String,
    pub issuer: String,
    pub subject_raw: Vec<u8>,
    pub issuer_raw: Vec<u8>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub is_ca: bool,
    pub path_len: Option<u32>,
    /// `None` when the certificate has no keyUsage extension.
    pub key_cert_sign: Option<bool>,
    /// `None` when there is no extendedKeyUsage extension; else whether it permits serverAuth.
    pub eku_allows_server_auth: Option<bool>,
    pub signature_algorithm: SignatureAlg,
    pub key: Option<KeyKind>,
    pub public_key_bits: Vec<u8>,
    pub spki: Vec<u8>,
    pub ski: Option<Vec<u8>>,
    pub aki: Option<Vec<u8>>,
    pub self_issued: bool,
    pub serial_hex: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct CertParseError {
    pub reason: String,
}

impl Cert {
    pub fn parse(der: Vec<u8>, text: String, origin: Origin) -> Result<Self, CertParseError> {
        let (rest, x509) = X509Certificate::from_der(&der).map_err(|e| CertParseError {
            reason: format!("not a valid X.509 certificate: {e}"),
        })?;
        if !rest.is_empty() {
            return Err(CertParseError {
                reason: "trailing bytes after the certificate".into(),
            });
        }
        let bc = x509.basic_constraints().map_err(|e| CertParseError {
            reason: format!("bad basicConstraints: {e}"),
        })?;
        let ku = x509.key_usage().map_err(|e| CertParseError {
            reason: format!("bad keyUsage: {e}"),
        })?;
        let eku = x509.extended_key_usage().map_err(|e| CertParseError {
            reason: format!("bad extendedKeyUsage: {e}"),
        })?;
        let mut ski = None;
        let mut aki = None;
        for ext in x509.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => ski = Some(id.0.to_vec()),
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    aki = a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => {}
            }
        }
        let cert = Cert {
            subject: x509.subject().to_string(),
            issuer: x509.issuer().to_string(),
            subject_raw: x509.subject().as_raw().to_vec(),
            issuer_raw: x509.issuer().as_raw().to_vec(),
            not_before: x509.validity().not_before.to_datetime(),
            not_after: x509.validity().not_after.to_datetime(),
            is_ca: bc.as_ref().is_some_and(|b| b.value.ca),
            path_len: bc.as_ref().and_then(|b| b.value.path_len_constraint),
            key_cert_sign: ku.map(|k| k.value.key_cert_sign()),
            eku_allows_server_auth: eku.map(|e| e.value.any || e.value.server_auth),
            signature_algorithm: SignatureAlg::from_oid(
                &x509.signature_algorithm.algorithm.to_id_string(),
            ),
            key: KeyKind::from_spki(x509.public_key().raw),
            public_key_bits: x509.public_key().subject_public_key.data.to_vec(),
            spki: x509.public_key().raw.to_vec(),
            ski,
            aki,
            self_issued: x509.subject().as_raw() == x509.issuer().as_raw(),
            serial_hex: x509.raw_serial_as_string(),
            der: Vec::new(),
            text,
            origin,
        };
        Ok(Cert { der, ..cert })
    }

    /// Whether `issuer`'s key verifies this certificate's signature.
    pub fn is_signed_by(&self, issuer: &Cert) -> bool {
        let (Ok((_, me)), Ok((_, parent))) = (
            X509Certificate::from_der(&self.der),
            X509Certificate::from_der(&issuer.der),
        ) else {
            return false;
        };
        me.verify_signature(Some(parent.public_key())).is_ok()
    }

    pub fn is_expired_at(&self, now: OffsetDateTime) -> bool {
        now >= self.not_after
    }

    pub fn is_not_yet_valid_at(&self, now: OffsetDateTime) -> bool {
        now < self.not_before
    }

    /// A readable name: the subject, or the origin when the subject is empty.
    pub fn name(&self) -> String {
        if self.subject.is_empty() {
            format!("<empty subject> from {}", self.origin)
        } else {
            format!("\"{}\"", self.subject)
        }
    }
}

/// Signature algorithms by name, so weak ones can be named in errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureAlg {
    Md5Rsa,
    Sha1Rsa,
    Sha1Ecdsa,
    Sha1Dsa,
    Sha256Rsa,
    Sha384Rsa,
    Sha512Rsa,
    RsaPss,
    Sha256Ecdsa,
    Sha384Ecdsa,
    Sha512Ecdsa,
    Ed25519,
    Other(String),
}

impl SignatureAlg {
    pub fn from_oid(oid: &str) -> Self {
        match oid {
            "1.2.840.113549.1.1.4" => Self::Md5Rsa,
            "1.2.840.113549.1.1.5" | "1.3.14.3.2.29" => Self::Sha1Rsa,
            "1.2.840.10045.4.1" => Self::Sha1Ecdsa,
            "1.2.840.10040.4.3" => Self::Sha1Dsa,
            "1.2.840.113549.1.1.11" => Self::Sha256Rsa,
            "1.2.840.113549.1.1.12" => Self::Sha384Rsa,
            "1.2.840.113549.1.1.13" => Self::Sha512Rsa,
            "1.2.840.113549.1.1.10" => Self::RsaPss,
            "1.2.840.10045.4.3.2" => Self::Sha256Ecdsa,
            "1.2.840.10045.4.3.3" => Self::Sha384Ecdsa,
            "1.2.840.10045.4.3.4" => Self::Sha512Ecdsa,
            "1.3.101.112" => Self::Ed25519,
            other => Self::Other(other.to_string()),
        }
    }

    /// MD5 and SHA-1 signatures are forgeable and refused by modern verifiers.
    pub fn is_weak(&self) -> bool {
        matches!(
            self,
            Self::Md5Rsa | Self::Sha1Rsa | Self::Sha1Ecdsa | Self::Sha1Dsa
        )
    }
}

impl std::fmt::Display for SignatureAlg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Md5Rsa => "md5WithRSAEncryption",
            Self::Sha1Rsa => "sha1WithRSAEncryption",
            Self::Sha1Ecdsa => "ecdsa-with-SHA1",
            Self::Sha1Dsa => "dsa-with-SHA1",
            Self::Sha256Rsa => "sha256WithRSAEncryption",
            Self::Sha384Rsa => "sha384WithRSAEncryption",
            Self::Sha512Rsa => "sha512WithRSAEncryption",
            Self::RsaPss => "rsassaPss",
            Self::Sha256Ecdsa => "ecdsa-with-SHA256",
            Self::Sha384Ecdsa => "ecdsa-with-SHA384",
            Self::Sha512Ecdsa => "ecdsa-with-SHA512",
            Self::Ed25519 => "Ed25519",
            Self::Other(oid) => oid,
        })
    }
}

/// Formats a time as RFC 3339 for messages.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&::time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}
