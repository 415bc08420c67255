//! Generating CA keys and certificates: the self-signed fallback root, the
//! sample bundle in `certs/`, and `plugca certs`.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom as _;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::ca::keys::{CaKey, KeyError};

/// Key algorithms plugca can generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyChoice {
    P256,
    P384,
    Rsa2048,
    Rsa3072,
    Rsa4096,
}

impl std::fmt::Display for KeyChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyChoice::P256 => "p256",
            KeyChoice::P384 => "p384",
            KeyChoice::Rsa2048 => "rsa2048",
            KeyChoice::Rsa3072 => "rsa3072",
            KeyChoice::Rsa4096 => "rsa4096",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("key generation failed: {0}")]
    Key(String),
    #[error("certificate generation failed: {0}")]
    Cert(String),
    #[error(transparent)]
    KeyFormat(#[from] KeyError),
}

/// Generates a fresh key of the chosen type.
pub fn generate_key(choice: KeyChoice) -> Result<CaKey, GenerateError> {
    let key_pair = match choice {
        KeyChoice::P256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        KeyChoice::P384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
        KeyChoice::Rsa2048 => rsa_key_pair(2048),
        KeyChoice::Rsa3072 => rsa_key_pair(3072),
        KeyChoice::Rsa4096 => rsa_key_pair(4096),
    }
    .map_err(|e| GenerateError::Key(e.to_string()))?;
    Ok(CaKey::from_key_pair(key_pair)?)
}

fn rsa_key_pair(bits: usize) -> Result<KeyPair, rcgen::Error> {
    use rsa::pkcs8::EncodePrivateKey as _;
    let key = rsa::PrivateKey::new(&mut getrandom::SysRng, bits)
        .map_err(|_| rcgen::Error::KeyGenerationUnavailable)?;
    let der = key
        .to_pkcs8_der()
        .map_err(|_| rcgen::Error::KeyGenerationUnavailable)?;
    KeyPair::try_from(der.as_bytes())
}

/// The subject and extensions of a CA certificate to generate.
#[derive(Debug, Clone)]
pub struct CaSpec {
    pub organization: Option<String>,
    pub common_name: Option<String>,
    pub locality: Option<String>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// `Some(0)` for an intermediate that may only issue leaves.
    pub path_len: Option<u8>,
    pub dns_sans: Vec<String>,
}

impl CaSpec {
    fn params(&self, key: &CaKey) -> Result<CertificateParams, GenerateError> {
        let mut params = CertificateParams::default();
        // RFC 5280 method 1: SHA-1 of the subjectPublicKey bits (what openssl's
        // subjectKeyIdentifier=hash writes), so linters recognise it.
        let digest = ring::digest::digest(
            &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
            key.public_key_bits(),
        );
        params.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(digest.as_ref().to_vec());
        let mut dn = DistinguishedName::new();
        if let Some(o) = &self.organization {
            dn.push(DnType::OrganizationName, o.as_str());
        }
        if let Some(cn) = &self.common_name {
            dn.push(DnType::CommonName, cn.as_str());
        }
        if let Some(l) = &self.locality {
            dn.push(DnType::LocalityName, l.as_str());
        }
        params.distinguished_name = dn;
        params.not_before = self.not_before;
        params.not_after = self.not_after;
        params.serial_number = Some(random_serial()?);
        params.is_ca = IsCa::Ca(match self.path_len {
            Some(n) => BasicConstraints::Constrained(n),
            None => BasicConstraints::Unconstrained,
        });
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        params.subject_alt_names = self
            .dns_sans
            .iter()
            .map(|d| {
                d.as_str()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|e| GenerateError::Cert(format!("DNS SAN {d:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(params)
    }
}

/// A generated CA certificate with its key.
pub struct GeneratedCa {
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    pub key: CaKey,
}

/// A self-signed root (SKI set; no AKI).
pub fn self_signed_root(spec: &CaSpec, key: CaKey) -> Result<GeneratedCa, GenerateError> {
    let (cert_pem, cert_der) = self_signed_cert(spec, &key)?;
    Ok(GeneratedCa {
        cert_pem,
        cert_der,
        key,
    })
}

/// A self-signed root certificate for an existing key: (PEM, DER).
pub fn self_signed_cert(spec: &CaSpec, key: &CaKey) -> Result<(String, Vec<u8>), GenerateError> {
    let params = spec.params(key)?;
    let cert = params
        .self_signed(key)
        .map_err(|e| GenerateError::Cert(e.to_string()))?;
    Ok((
        crate::pem::encode("CERTIFICATE", cert.der()),
        cert.der().to_vec(),
    ))
}

/// A CA certificate for `key` signed by `parent` (SKI and AKI set).
pub fn intermediate(
    spec: &CaSpec,
    key: CaKey,
    parent_cert_der: &[u8],
    parent_key: &CaKey,
) -> Result<GeneratedCa, GenerateError> {
    let mut params = spec.params(&key)?;
    params.use_authority_key_identifier_extension = true;
    let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(parent_cert_der), parent_key)
        .map_err(|e| GenerateError::Cert(e.to_string()))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| GenerateError::Cert(e.to_string()))?;
    Ok(GeneratedCa {
        cert_pem: crate::pem::encode("CERTIFICATE", cert.der()),
        cert_der: cert.der().to_vec(),
        key,
    })
}

fn random_serial() -> Result<SerialNumber, GenerateError> {
    let mut serial = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| GenerateError::Cert("no randomness for the serial".into()))?;
    serial[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&serial))
}
