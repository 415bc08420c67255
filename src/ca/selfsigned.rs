//! The self-signed fallback, like istiod's `istio-ca-secret`: a root with
//! subject `O=<trust domain>`, optionally persisted in a directory so a restart
//! keeps it, and renewed with the same key before its last 20 % of life.

use std::path::{Path, PathBuf};
use std::time::Duration;

use time::OffsetDateTime;

use crate::ca::bundle::{self, BundleError, CaBundle};
use crate::ca::generate::{self, CaSpec, GenerateError, KeyChoice};
use crate::ca::keys::{CaKey, KeyError};

pub const CERT_FILE: &str = "ca-cert.pem";
pub const KEY_FILE: &str = "ca-key.pem";
/// Renew when less than this share of the root's lifetime remains (istiod: 20 %).
pub const GRACE_PERCENT: i64 = 20;

/// How to make and keep the self-signed root.
#[derive(Debug, Clone)]
pub struct SelfSignedSpec {
    /// Where to persist the root and key; `None` keeps them in memory only.
    pub dir: Option<PathBuf>,
    pub key: KeyChoice,
    pub ttl: Duration,
    /// Subject organization: the trust domain.
    pub organization: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SelfSignedError {
    #[error("{0}")]
    Bundle(#[from] BundleError),
    #[error("{0}")]
    Generate(#[from] GenerateError),
    #[error("{file}: {error}")]
    Key { file: PathBuf, error: KeyError },
    #[error("{file}: cannot write: {reason}")]
    Write { file: PathBuf, reason: String },
    #[error("{dir}: has {present} but not {missing}; remove it or restore the pair")]
    Partial {
        dir: PathBuf,
        present: &'static str,
        missing: &'static str,
    },
}

/// What happened when the self-signed CA was set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Generated,
    Loaded,
    Renewed,
}

/// Loads the persisted root (renewing it if due) or generates a new one.
pub fn load_or_create(
    spec: &SelfSignedSpec,
    now: OffsetDateTime,
) -> Result<(CaBundle, Origin), SelfSignedError> {
    if let Some(dir) = &spec.dir {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let cert_pem = bundle::read_pem_file(&cert_path)?;
                let key_pem = bundle::read_pem_file(&key_path)?;
                let key = CaKey::ca_from_pem(&key_pem).map_err(|error| SelfSignedError::Key {
                    file: key_path.clone(),
                    error,
                })?;
                let cert = crate::pem::parse_first(&cert_pem).map_err(|error| {
                    SelfSignedError::Bundle(BundleError::Pem {
                        file: cert_path.clone(),
                        error,
                    })
                })?;
                let facts = crate::ca::cert::Cert::parse(
                    cert.der,
                    cert.text,
                    crate::ca::cert::Origin {
                        file: cert_path.display().to_string(),
                        index: 0,
                    },
                )
                .map_err(|e| {
                    SelfSignedError::Bundle(BundleError::CertParse {
                        origin: cert_path.display().to_string(),
                        reason: e.reason,
                    })
                })?;
                if is_due(facts.not_before, facts.not_after, now) {
                    let bundle = renew_with(spec, key, now)?;
                    return Ok((bundle, Origin::Renewed));
                }
                return Ok((CaBundle::self_signed(cert_pem, key, now)?, Origin::Loaded));
            }
            (true, false) => {
                return Err(SelfSignedError::Partial {
                    dir: dir.clone(),
                    present: CERT_FILE,
                    missing: KEY_FILE,
                });
            }
            (false, true) => {
                return Err(SelfSignedError::Partial {
                    dir: dir.clone(),
                    present: KEY_FILE,
                    missing: CERT_FILE,
                });
            }
            (false, false) => {}
        }
    }
    let key = generate::generate_key(spec.key)?;
    Ok((renew_with(spec, key, now)?, Origin::Generated))
}

/// A renewed bundle (same key, same subject, new validity) when `current` is
/// in the last [`GRACE_PERCENT`] of its life; `None` otherwise.
pub fn renew_if_due(
    spec: &SelfSignedSpec,
    current: &CaBundle,
    now: OffsetDateTime,
) -> Result<Option<CaBundle>, SelfSignedError> {
    let root = current.signing_cert();
    if !is_due(root.not_before, root.not_after, now) {
        return Ok(None);
    }
    let key_pem = current.signer().secret_key().secret_pkcs8_pem();
    let key = CaKey::ca_from_pem(&key_pem).map_err(|error| SelfSignedError::Key {
        file: PathBuf::from("in-memory self-signed key"),
        error,
    })?;
    renew_with(spec, key, now).map(Some)
}

/// Whether less than [`GRACE_PERCENT`] of the lifetime remains.
pub fn is_due(not_before: OffsetDateTime, not_after: OffsetDateTime, now: OffsetDateTime) -> bool {
    let lifetime = (not_after - not_before).whole_seconds();
    let remaining = (not_after - now).whole_seconds();
    remaining * 100 < lifetime * GRACE_PERCENT
}

/// Signs a root for `key`, persists it (key mode 0600) and builds the bundle.
fn renew_with(
    spec: &SelfSignedSpec,
    key: CaKey,
    now: OffsetDateTime,
) -> Result<CaBundle, SelfSignedError> {
    let ttl = time::Duration::try_from(spec.ttl).unwrap_or(time::Duration::days(3650));
    let (cert_pem, _) = generate::self_signed_cert(
        &CaSpec {
            organization: Some(spec.organization.clone()),
            common_name: None,
            locality: None,
            not_before: now,
            not_after: now + ttl,
            path_len: None,
            dns_sans: Vec::new(),
        },
        &key,
    )?;
    if let Some(dir) = &spec.dir {
        persist(dir, &cert_pem, &key)?;
    }
    Ok(CaBundle::self_signed(cert_pem, key, now)?)
}

fn persist(dir: &Path, cert_pem: &str, key: &CaKey) -> Result<(), SelfSignedError> {
    let write_err = |file: PathBuf, e: std::io::Error| SelfSignedError::Write {
        file,
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir.to_path_buf(), e))?;
    let key_path = dir.join(KEY_FILE);
    crate::fsutil::write_file(&key_path, key.secret_pkcs8_pem().as_bytes(), true)
        .map_err(|e| write_err(key_path.clone(), e))?;
    let cert_path = dir.join(CERT_FILE);
    crate::fsutil::write_file(&cert_path, cert_pem.as_bytes(), false)
        .map_err(|e| write_err(cert_path.clone(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: Option<PathBuf>) -> SelfSignedSpec {
        SelfSignedSpec {
            dir,
            key: KeyChoice::P256,
            ttl: Duration::from_secs(3650 * 86_400),
            organization: "cluster.local".into(),
        }
    }

    #[test]
    fn renewal_is_due_in_the_last_fifth_of_life() {
        let nb = OffsetDateTime::from_unix_timestamp(0).unwrap();
        let na = nb + time::Duration::days(100);
        assert!(!is_due(nb, na, nb + time::Duration::days(79)));
        assert!(is_due(nb, na, nb + time::Duration::days(81)));
    }

    #[test]
    fn a_persisted_root_survives_a_restart_and_renews_with_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let (first, origin) = load_or_create(&spec(Some(dir.path().into())), now).unwrap();
        assert_eq!(origin, Origin::Generated);
        assert_eq!(first.signing_cert().subject, "O=cluster.local");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (second, origin) = load_or_create(&spec(Some(dir.path().into())), now).unwrap();
        assert_eq!(origin, Origin::Loaded);
        assert_eq!(second.signing_cert().der, first.signing_cert().der);

        // Nine years on, the root is in its last 20 %: renewed with the same key.
        let later = now + time::Duration::days(9 * 365);
        let renewed = renew_if_due(&spec(Some(dir.path().into())), &second, later)
            .unwrap()
            .expect("renewal due");
        assert_ne!(renewed.signing_cert().der, first.signing_cert().der);
        assert_eq!(renewed.signing_cert().spki, first.signing_cert().spki);
        assert_eq!(
            renewed.signing_cert().subject_raw,
            first.signing_cert().subject_raw
        );
        let (reloaded, _) = load_or_create(&spec(Some(dir.path().into())), later).unwrap();
        assert_eq!(reloaded.signing_cert().der, renewed.signing_cert().der);
    }

    #[test]
    fn a_lone_key_or_cert_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CERT_FILE), "x").unwrap();
        assert!(matches!(
            load_or_create(&spec(Some(dir.path().into())), OffsetDateTime::now_utc()),
            Err(SelfSignedError::Partial { .. })
        ));
    }
}
