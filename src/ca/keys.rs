//! CA private keys: PKCS#1, SEC1 (optionally after an `EC PARAMETERS` block)
//! and PKCS#8, normalised to PKCS#8 for rcgen/ring. Secrets never reach `Debug`.

use rcgen::{KeyPair, PublicKeyData};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;
use zeroize::Zeroizing;

use crate::asn1;
use crate::pem;

/// Key algorithms a CA may sign with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa { bits: usize },
    EcdsaP256,
    EcdsaP384,
    Ed25519,
}

impl KeyKind {
    /// Label used in metrics and reports (`rsa2048`, `p256`, ...).
    pub fn label(&self) -> String {
        match self {
            KeyKind::Rsa { bits } => format!("rsa{bits}"),
            KeyKind::EcdsaP256 => "p256".into(),
            KeyKind::EcdsaP384 => "p384".into(),
            KeyKind::Ed25519 => "ed25519".into(),
        }
    }

    /// Reads the key kind of a DER SubjectPublicKeyInfo.
    pub fn from_spki(spki_der: &[u8]) -> Option<KeyKind> {
        let (_, spki) = SubjectPublicKeyInfo::from_der(spki_der).ok()?;
        match spki.parsed().ok()? {
            PublicKey::RSA(rsa) => Some(KeyKind::Rsa {
                bits: rsa.key_size(),
            }),
            PublicKey::EC(point) => match point.key_size() {
                256 => Some(KeyKind::EcdsaP256),
                384 => Some(KeyKind::EcdsaP384),
                _ => None,
            },
            _ if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => Some(KeyKind::Ed25519),
            _ => None,
        }
    }
}

impl std::fmt::Display for KeyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyKind::Rsa { bits } => write!(f, "RSA {bits}"),
            KeyKind::EcdsaP256 => f.write_str("ECDSA P-256"),
            KeyKind::EcdsaP384 => f.write_str("ECDSA P-384"),
            KeyKind::Ed25519 => f.write_str("Ed25519"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("no PEM block found (expected a private key)")]
    NoPem,
    #[error("invalid PEM: {0}")]
    Pem(pem::PemError),
    #[error(
        "the key is encrypted; plugca needs an unencrypted key (decrypt it with `openssl pkey -in KEY -out KEY.plain`)"
    )]
    Encrypted,
    #[error("unsupported PEM block type for a private key: {0}")]
    UnsupportedBlock(String),
    #[error("the EC key does not name its curve (and no EC PARAMETERS block does)")]
    MissingCurve,
    #[error("unsupported EC curve {0} (supported: P-256, P-384)")]
    UnsupportedCurve(String),
    #[error("malformed {label} key: {reason}")]
    Malformed { label: String, reason: String },
    #[error("unsupported CA key {0} (supported: RSA 2048-4096, ECDSA P-256, ECDSA P-384)")]
    UnsupportedKind(KeyKind),
}

/// A parsed private key. Not `Clone`; `Debug` shows only the algorithm.
pub struct CaKey {
    key_pair: KeyPair,
    kind: KeyKind,
    /// PEM label of the block it came from (`RSA PRIVATE KEY`, `EC PRIVATE KEY`, `PRIVATE KEY`).
    source_label: String,
    /// An `EC PARAMETERS` block preceded the key (`openssl ecparam -genkey` output).
    had_ec_parameters: bool,
}

impl std::fmt::Debug for CaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaKey")
            .field("kind", &self.kind)
            .field("secret", &"[elided]")
            .finish()
    }
}

impl CaKey {
    /// Parses the first private key of a PEM file.
    pub fn from_pem(text: &str) -> Result<Self, KeyError> {
        if text.contains("Proc-Type: 4,ENCRYPTED") {
            return Err(KeyError::Encrypted);
        }
        let blocks = pem::parse_all(text).map_err(|e| match e {
            pem::PemError::Empty => KeyError::NoPem,
            other => KeyError::Pem(other),
        })?;
        let mut ec_params_curve: Option<Vec<u8>> = None;
        let mut had_ec_parameters = false;
        for block in &blocks {
            // Wrap secrets so intermediate copies are wiped.
            let der = Zeroizing::new(block.der.clone());
            let pkcs8: Zeroizing<Vec<u8>> = match block.label.as_str() {
                "EC PARAMETERS" => {
                    had_ec_parameters = true;
                    ec_params_curve = Some(block.der.clone());
                    continue;
                }
                "PRIVATE KEY" => der,
                "RSA PRIVATE KEY" => {
                    Zeroizing::new(asn1::pkcs8_wrap(asn1::RSA_ENCRYPTION_ALG, &der))
                }
                "EC PRIVATE KEY" => {
                    let curve = sec1_curve(&der)?
                        .or_else(|| ec_params_curve.clone())
                        .ok_or(KeyError::MissingCurve)?;
                    if curve != asn1::OID_P256 && curve != asn1::OID_P384 {
                        return Err(KeyError::UnsupportedCurve(oid_text(&curve)));
                    }
                    Zeroizing::new(asn1::pkcs8_wrap(&asn1::ec_algorithm(&curve), &der))
                }
                "ENCRYPTED PRIVATE KEY" => return Err(KeyError::Encrypted),
                other => return Err(KeyError::UnsupportedBlock(other.to_string())),
            };
            let key_pair =
                KeyPair::try_from(pkcs8.as_slice()).map_err(|e| KeyError::Malformed {
                    label: block.label.clone(),
                    reason: e.to_string(),
                })?;
            let kind =
                KeyKind::from_spki(&key_pair.subject_public_key_info()).ok_or_else(|| {
                    KeyError::Malformed {
                        label: block.label.clone(),
                        reason: "unrecognised public key".into(),
                    }
                })?;
            return Ok(Self {
                key_pair,
                kind,
                source_label: block.label.clone(),
                had_ec_parameters,
            });
        }
        Err(KeyError::UnsupportedBlock("EC PARAMETERS".into()))
    }

    /// Like [`CaKey::from_pem`], and refuses key types a CA must not use.
    pub fn ca_from_pem(text: &str) -> Result<Self, KeyError> {
        let key = Self::from_pem(text)?;
        match key.kind {
            KeyKind::Rsa { bits } if (2048..=4096).contains(&bits) => Ok(key),
            KeyKind::EcdsaP256 | KeyKind::EcdsaP384 => Ok(key),
            other => Err(KeyError::UnsupportedKind(other)),
        }
    }

    pub fn from_key_pair(key_pair: KeyPair) -> Result<Self, KeyError> {
        let kind = KeyKind::from_spki(&key_pair.subject_public_key_info()).ok_or_else(|| {
            KeyError::Malformed {
                label: "PRIVATE KEY".into(),
                reason: "unrecognised public key".into(),
            }
        })?;
        Ok(Self {
            key_pair,
            kind,
            source_label: "PRIVATE KEY".into(),
            had_ec_parameters: false,
        })
    }

    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    pub fn source_label(&self) -> &str {
        &self.source_label
    }

    pub fn had_ec_parameters(&self) -> bool {
        self.had_ec_parameters
    }

    /// The DER SubjectPublicKeyInfo of the key.
    pub fn public_spki(&self) -> Vec<u8> {
        self.key_pair.subject_public_key_info()
    }

    /// The subjectPublicKey bits (what a certificate must carry for this key).
    pub fn public_key_bits(&self) -> &[u8] {
        self.key_pair.der_bytes()
    }

    /// The signing key itself. Named so that every use is visible in review.
    pub fn secret_key_pair(&self) -> &KeyPair {
        &self.key_pair
    }

    /// PKCS#8 PEM of the key, for writing key files.
    pub fn secret_pkcs8_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.key_pair.serialize_pem())
    }
}

/// The curve OID TLV of a SEC1 ECPrivateKey, if the key names it.
fn sec1_curve(der: &[u8]) -> Result<Option<Vec<u8>>, KeyError> {
    use der::Decode as _;
    use der::Encode as _;
    let key = sec1::EcPrivateKey::from_der(der).map_err(|e| KeyError::Malformed {
        label: "EC PRIVATE KEY".into(),
        reason: e.to_string(),
    })?;
    if key.public_key.is_none() {
        return Err(KeyError::Malformed {
            label: "EC PRIVATE KEY".into(),
            reason: "the key does not include its public key".into(),
        });
    }
    Ok(key
        .parameters
        .and_then(|p| p.named_curve())
        .and_then(|oid| oid.to_der().ok()))
}

fn oid_text(tlv: &[u8]) -> String {
    x509_parser::der_parser::oid::Oid::new(std::borrow::Cow::Borrowed(
        tlv.get(2..).unwrap_or_default(),
    ))
    .to_id_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/istio-sample-certs");

    fn sample(name: &str) -> String {
        std::fs::read_to_string(format!("{SAMPLES}/{name}")).unwrap()
    }

    #[test]
    fn pkcs1_and_pkcs8_rsa_keys_load() {
        let k = CaKey::ca_from_pem(&sample("ca-key.pem")).unwrap();
        assert_eq!(k.kind(), KeyKind::Rsa { bits: 2048 });
        assert_eq!(k.source_label(), "RSA PRIVATE KEY");
        let k = CaKey::ca_from_pem(&sample("ca-key-alt.pem")).unwrap();
        assert_eq!(k.kind(), KeyKind::Rsa { bits: 4096 });
    }

    #[test]
    fn openssl_sec1_keys_load_with_and_without_ec_parameters() {
        for (curve, kind) in [
            ("prime256v1", KeyKind::EcdsaP256),
            ("secp384r1", KeyKind::EcdsaP384),
        ] {
            // `openssl ecparam -genkey` writes an EC PARAMETERS block before the key.
            let out = std::process::Command::new("openssl")
                .args(["ecparam", "-genkey", "-name", curve])
                .output()
                .expect("openssl is installed");
            let text = String::from_utf8(out.stdout).unwrap();
            assert!(text.contains("BEGIN EC PARAMETERS") && text.contains("BEGIN EC PRIVATE KEY"));
            let k = CaKey::ca_from_pem(&text).unwrap();
            assert_eq!(k.kind(), kind);
            assert!(k.had_ec_parameters());
            assert_eq!(k.source_label(), "EC PRIVATE KEY");
            let key_only = &text[text.find("-----BEGIN EC PRIVATE KEY").unwrap()..];
            let k = CaKey::ca_from_pem(key_only).unwrap();
            assert_eq!(k.kind(), kind);
            assert!(!k.had_ec_parameters());
        }
    }

    #[test]
    fn a_sec1_key_without_curve_needs_ec_parameters() {
        let kp = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        // The key inside PKCS#8 omits the curve (the outer algorithm names it).
        let sec1 = inner_private_key(&kp.serialize_der());
        let sec1_pem = pem::encode("EC PRIVATE KEY", &sec1);
        assert_eq!(
            CaKey::ca_from_pem(&sec1_pem).unwrap_err(),
            KeyError::MissingCurve
        );
        let with_params = format!(
            "{}{}",
            pem::encode("EC PARAMETERS", asn1::OID_P384),
            sec1_pem
        );
        let k = CaKey::ca_from_pem(&with_params).unwrap();
        assert_eq!(k.kind(), KeyKind::EcdsaP384);
        assert_eq!(k.public_key_bits(), kp.der_bytes());
    }

    #[test]
    fn non_key_blocks_are_named() {
        assert_eq!(
            CaKey::from_pem(&sample("ca-cert.pem")).unwrap_err(),
            KeyError::UnsupportedBlock("CERTIFICATE".into())
        );
        assert_eq!(
            CaKey::from_pem(
                "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n"
            )
            .unwrap_err(),
            KeyError::Encrypted
        );
        assert_eq!(CaKey::from_pem("nothing").unwrap_err(), KeyError::NoPem);
        assert!(matches!(
            CaKey::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
            Err(KeyError::Malformed { .. })
        ));
    }

    #[test]
    fn ed25519_is_not_a_ca_key() {
        let kp = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert_eq!(
            CaKey::ca_from_pem(&kp.serialize_pem()).unwrap_err(),
            KeyError::UnsupportedKind(KeyKind::Ed25519)
        );
    }

    #[test]
    fn debug_never_shows_the_key() {
        let k = CaKey::ca_from_pem(&sample("ca-key.pem")).unwrap();
        let shown = format!("{k:?}");
        assert!(
            shown.contains("[elided]") && !shown.contains("MII"),
            "{shown}"
        );
    }

    /// Extracts the privateKey OCTET STRING of a PKCS#8 structure (test helper).
    fn inner_private_key(pkcs8: &[u8]) -> Vec<u8> {
        use der::Decode as _;
        let info = pkcs8::PrivateKeyInfoRef::from_der(pkcs8).unwrap();
        info.private_key.as_bytes().to_vec()
    }
}
