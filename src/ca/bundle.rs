//! Loading and checking a plugged-in CA bundle. A [`CaBundle`] is immutable
//! once built; a reload builds a new one and swaps it whole.

use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use crate::ca::cert::{Cert, Origin, rfc3339};
use crate::ca::keys::{CaKey, KeyError};
use crate::ca::signer::Signer;
use crate::pem::{self, PemError};

/// Largest PEM file read from the cacerts directory.
pub const MAX_PEM_FILE_BYTES: u64 = 1024 * 1024;
/// Longest signing path accepted (signing cert, intermediates, root).
pub const MAX_CHAIN_LEN: usize = 8;

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";
pub const ROOT_CERT: &str = "root-cert.pem";
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const TLS_CA: &str = "ca.crt";

/// Which file layout the bundle was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem` (istiod's `cacerts`).
    Istiod,
    /// `tls.crt`, `tls.key`, `ca.crt` (a `kubernetes.io/tls` secret, e.g. from cert-manager).
    KubernetesTls,
    /// Generated in memory or in `--self-signed-dir`.
    SelfSigned,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layout::Istiod => {
                "istiod cacerts (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem)"
            }
            Layout::KubernetesTls => "kubernetes.io/tls (tls.crt, tls.key, ca.crt)",
            Layout::SelfSigned => "self-signed",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error(
        "incomplete CA bundle in {dir}: found {present} but {missing} missing (a plugged-in CA needs all of {needed})"
    )]
    Incomplete {
        dir: PathBuf,
        present: String,
        missing: String,
        needed: String,
    },
    #[error("{file}: cannot read: {reason}")]
    Read { file: PathBuf, reason: String },
    #[error("{file}: larger than {limit} bytes")]
    TooLarge { file: PathBuf, limit: u64 },
    #[error("{file}: {error}")]
    Pem { file: PathBuf, error: PemError },
    #[error("{file}: no certificate found")]
    NoCertificate { file: PathBuf },
    #[error("{file}: block {index} is a \"{label}\" block, not a CERTIFICATE")]
    NotACertificate {
        file: PathBuf,
        index: usize,
        label: String,
    },
    #[error("{origin}: {reason}")]
    CertParse { origin: String, reason: String },
    #[error("{file}: {error}")]
    Key { file: PathBuf, error: KeyError },
    #[error(
        "the cert does not match the key: {key_file} is the key of another certificate than {cert_file} ({subject})"
    )]
    KeyMismatch {
        cert_file: String,
        key_file: String,
        subject: String,
    },
    #[error(
        "{origin}: {subject} is not a CA certificate (basicConstraints CA:TRUE missing): it is not authorized to sign other certificates"
    )]
    NotCa { origin: String, subject: String },
    #[error("{origin}: {subject} has a keyUsage without keyCertSign: it may not sign certificates")]
    NoKeyCertSign { origin: String, subject: String },
    #[error(
        "{origin}: {subject} has an extendedKeyUsage without serverAuth, so certificates it issues would not verify as TLS certificates"
    )]
    EkuWithoutServerAuth { origin: String, subject: String },
    #[error(
        "{origin}: {subject} is signed with {algorithm}, which is not allowed (use SHA-256 or better)"
    )]
    WeakSignature {
        origin: String,
        subject: String,
        algorithm: String,
    },
    #[error("{origin}: {subject} expired at {not_after}")]
    Expired {
        origin: String,
        subject: String,
        not_after: String,
    },
    #[error("{origin}: {subject} is not valid before {not_before}")]
    NotYetValid {
        origin: String,
        subject: String,
        not_before: String,
    },
    #[error(
        "cannot verify the chain: {origin} ({subject}) was issued by \"{issuer}\", which is in neither {chain_file} nor {root_file}"
    )]
    IssuerMissing {
        origin: String,
        subject: String,
        issuer: String,
        chain_file: String,
        root_file: String,
    },
    #[error(
        "cannot verify the chain: the signature of {origin} ({subject}) does not verify with the key of {parent_origin} (\"{issuer}\"): it was signed by another CA with the same name"
    )]
    BadSignature {
        origin: String,
        subject: String,
        parent_origin: String,
        issuer: String,
    },
    #[error(
        "{origin}: {subject} has pathlen:{path_len} but {below} CA certificate(s) sit below it in the chain"
    )]
    PathLen {
        origin: String,
        subject: String,
        path_len: u32,
        below: usize,
    },
    #[error("the chain from {signing} to a root is longer than {max} certificates")]
    ChainTooLong { signing: String, max: usize },
    #[error("{origin}: unsupported certificate key ({reason})")]
    UnsupportedKey { origin: String, reason: String },
    #[error("cannot use the CA key and certificate for signing: {0}")]
    Signer(String),
}

/// The files of a bundle, read but not yet checked.
#[derive(Debug)]
pub struct BundleFiles {
    pub layout: Layout,
    pub cert_file: String,
    pub key_file: String,
    pub chain_file: String,
    pub root_file: String,
    pub signing_pem: String,
    /// Key text; handled only by [`CaKey`].
    key_pem: zeroize::Zeroizing<String>,
    pub chain_pem: String,
    pub root_pem: String,
}

/// A loaded, checked CA: what signing and responses need, precomputed.
pub struct CaBundle {
    layout: Layout,
    signer: Signer,
    signing: Cert,
    /// Signing cert, intermediates, and the root anchor that ends the path.
    path: Vec<Cert>,
    roots: Vec<Cert>,
    /// Response elements after the leaf: served chain (one cert each, `\n`-terminated) then the root bundle.
    response_tail: Vec<String>,
    root_bundle: String,
    /// Earliest NotAfter on the signing path: no leaf outlives it.
    not_after_limit: OffsetDateTime,
    loaded_at: OffsetDateTime,
}

impl std::fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaBundle")
            .field("layout", &self.layout)
            .field("signing", &self.signing.subject)
            .field("roots", &self.roots.len())
            .field("key", &"[elided]")
            .finish()
    }
}

impl CaBundle {
    /// Reads the bundle in `dir`. `Ok(None)` when the directory holds none of
    /// the bundle files (self-signed mode); an error for a partial or bad one.
    pub fn load_dir(dir: &Path, now: OffsetDateTime) -> Result<Option<Self>, BundleError> {
        match read_files(dir)? {
            None => Ok(None),
            Some(files) => Self::from_files(files, now).map(Some),
        }
    }

    /// Checks a bundle and prepares it for signing.
    pub fn from_files(files: BundleFiles, now: OffsetDateTime) -> Result<Self, BundleError> {
        let signing_blocks = cert_blocks(&files.cert_file, &files.signing_pem, false)?;
        let mut signing_certs = parse_certs(&files.cert_file, signing_blocks)?;
        let signing = signing_certs.remove(0);
        // In the TLS layout tls.crt may carry intermediates after the signing cert.
        let mut chain = signing_certs;
        let chain_blocks = cert_blocks(&files.chain_file, &files.chain_pem, true)?;
        chain.extend(parse_certs(&files.chain_file, chain_blocks)?);
        let root_blocks = cert_blocks(&files.root_file, &files.root_pem, false)?;
        let roots = parse_certs(&files.root_file, root_blocks)?;

        let key = CaKey::ca_from_pem(&files.key_pem).map_err(|error| BundleError::Key {
            file: PathBuf::from(&files.key_file),
            error,
        })?;
        if signing.key.is_none() {
            return Err(BundleError::UnsupportedKey {
                origin: signing.origin.to_string(),
                reason: "not RSA, ECDSA P-256/P-384 or Ed25519".into(),
            });
        }
        if key.public_key_bits() != signing.public_key_bits.as_slice() {
            return Err(BundleError::KeyMismatch {
                cert_file: files.cert_file.clone(),
                key_file: files.key_file.clone(),
                subject: signing.name(),
            });
        }

        let path = build_path(&signing, &chain, &roots, &files)?;
        check_path(&path, now)?;

        let mut response_tail: Vec<String> = path[..path.len() - 1]
            .iter()
            .map(|c| format!("{}\n", c.text))
            .collect();
        if path.len() == 1 {
            // The signing cert is itself a root: nothing between leaf and roots.
            response_tail.clear();
        }
        response_tail.push(files.root_pem.clone());

        let not_after_limit = path
            .iter()
            .map(|c| c.not_after)
            .min()
            .unwrap_or(signing.not_after);
        let signer = Signer::new(&signing, key).map_err(BundleError::Signer)?;
        Ok(CaBundle {
            layout: files.layout,
            signer,
            signing: signing.clone(),
            path,
            roots,
            response_tail,
            root_bundle: files.root_pem,
            not_after_limit,
            loaded_at: now,
        })
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    pub fn signing_cert(&self) -> &Cert {
        &self.signing
    }

    /// The verified path: signing cert, intermediates, root anchor.
    pub fn path(&self) -> &[Cert] {
        &self.path
    }

    pub fn roots(&self) -> &[Cert] {
        &self.roots
    }

    /// Response elements that follow the leaf; the last one is the root bundle.
    pub fn response_tail(&self) -> &[String] {
        &self.response_tail
    }

    /// Intermediates served after a leaf (the response tail without the root bundle).
    pub fn served_chain(&self) -> &[String] {
        &self.response_tail[..self.response_tail.len() - 1]
    }

    /// DER of the certificates served between a leaf and the roots.
    pub fn served_chain_der(&self) -> Vec<Vec<u8>> {
        if self.path.len() <= 1 {
            return Vec::new();
        }
        self.path[..self.path.len() - 1]
            .iter()
            .map(|c| c.der.clone())
            .collect()
    }

    /// The root bundle text, verbatim.
    pub fn root_bundle(&self) -> &str {
        &self.root_bundle
    }

    pub fn not_after_limit(&self) -> OffsetDateTime {
        self.not_after_limit
    }

    pub fn loaded_at(&self) -> OffsetDateTime {
        self.loaded_at
    }

    /// NotAfter of the first root in the bundle (istiod's root expiry metric).
    pub fn root_expiry(&self) -> OffsetDateTime {
        self.roots
            .first()
            .map(|r| r.not_after)
            .unwrap_or(self.signing.not_after)
    }

    /// Builds the in-memory bundle of a self-signed root (signing cert = root).
    pub fn self_signed(
        root_pem: String,
        key: CaKey,
        now: OffsetDateTime,
    ) -> Result<Self, BundleError> {
        let key_pem = key.secret_pkcs8_pem();
        let files = BundleFiles {
            layout: Layout::SelfSigned,
            cert_file: "self-signed root".into(),
            key_file: "self-signed key".into(),
            chain_file: "self-signed chain".into(),
            root_file: "self-signed root".into(),
            signing_pem: root_pem.clone(),
            key_pem: zeroize::Zeroizing::new(key_pem.to_string()),
            chain_pem: String::new(),
            root_pem,
        };
        Self::from_files(files, now)
    }
}

impl BundleFiles {
    pub fn new(
        layout: Layout,
        names: [&str; 4],
        signing_pem: String,
        key_pem: zeroize::Zeroizing<String>,
        chain_pem: String,
        root_pem: String,
    ) -> Self {
        let [cert_file, key_file, chain_file, root_file] = names.map(String::from);
        BundleFiles {
            layout,
            cert_file,
            key_file,
            chain_file,
            root_file,
            signing_pem,
            key_pem,
            chain_pem,
            root_pem,
        }
    }

    pub fn secret_key_pem(&self) -> &str {
        &self.key_pem
    }
}

/// Detects the layout in `dir` and reads its files. `Ok(None)` if no bundle file exists.
pub fn read_files(dir: &Path) -> Result<Option<BundleFiles>, BundleError> {
    let exists = |name: &str| dir.join(name).exists();
    if exists(TLS_CRT) {
        let needed = [TLS_CRT, TLS_KEY, TLS_CA];
        check_complete(dir, &needed)?;
        let cert = read_pem_file(&dir.join(TLS_CRT))?;
        return Ok(Some(BundleFiles::new(
            Layout::KubernetesTls,
            [TLS_CRT, TLS_KEY, TLS_CRT, TLS_CA],
            cert,
            zeroize::Zeroizing::new(read_pem_file(&dir.join(TLS_KEY))?),
            String::new(),
            read_pem_file(&dir.join(TLS_CA))?,
        )));
    }
    let needed = [CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT];
    if !needed.iter().any(|n| exists(n)) {
        return Ok(None);
    }
    check_complete(dir, &needed)?;
    Ok(Some(BundleFiles::new(
        Layout::Istiod,
        needed,
        read_pem_file(&dir.join(CA_CERT))?,
        zeroize::Zeroizing::new(read_pem_file(&dir.join(CA_KEY))?),
        read_pem_file(&dir.join(CERT_CHAIN))?,
        read_pem_file(&dir.join(ROOT_CERT))?,
    )))
}

fn check_complete(dir: &Path, needed: &[&str]) -> Result<(), BundleError> {
    let (present, missing): (Vec<&str>, Vec<&str>) =
        needed.iter().partition(|n| dir.join(n).exists());
    if missing.is_empty() {
        return Ok(());
    }
    Err(BundleError::Incomplete {
        dir: dir.to_path_buf(),
        present: present.join(", "),
        missing: format!(
            "{} {}",
            missing.join(", "),
            if missing.len() == 1 { "is" } else { "are" }
        ),
        needed: needed.join(", "),
    })
}

/// Reads a PEM file with a size bound, naming the file in every error.
pub fn read_pem_file(path: &Path) -> Result<String, BundleError> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| BundleError::Read {
        file: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| BundleError::Read {
            file: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if bytes.len() as u64 > MAX_PEM_FILE_BYTES {
        return Err(BundleError::TooLarge {
            file: path.to_path_buf(),
            limit: MAX_PEM_FILE_BYTES,
        });
    }
    String::from_utf8(bytes).map_err(|_| BundleError::Read {
        file: path.to_path_buf(),
        reason: "not UTF-8 text (is it DER instead of PEM?)".into(),
    })
}

fn cert_blocks(file: &str, text: &str, may_be_empty: bool) -> Result<Vec<pem::Block>, BundleError> {
    let blocks = match pem::parse_all(text) {
        Ok(b) => b,
        Err(PemError::Empty) if may_be_empty && text.trim().is_empty() => return Ok(Vec::new()),
        Err(PemError::Empty) => {
            return Err(BundleError::NoCertificate {
                file: PathBuf::from(file),
            });
        }
        Err(error) => {
            return Err(BundleError::Pem {
                file: PathBuf::from(file),
                error,
            });
        }
    };
    if let Some((index, b)) = blocks
        .iter()
        .enumerate()
        .find(|(_, b)| b.label != "CERTIFICATE")
    {
        return Err(BundleError::NotACertificate {
            file: PathBuf::from(file),
            index: index + 1,
            label: b.label.clone(),
        });
    }
    Ok(blocks)
}

fn parse_certs(file: &str, blocks: Vec<pem::Block>) -> Result<Vec<Cert>, BundleError> {
    blocks
        .into_iter()
        .enumerate()
        .map(|(index, b)| {
            let origin = Origin {
                file: file.to_string(),
                index,
            };
            Cert::parse(b.der, b.text, origin.clone()).map_err(|e| BundleError::CertParse {
                origin: origin.to_string(),
                reason: e.reason,
            })
        })
        .collect()
}

/// Walks from the signing cert to a root, through the chain file's certificates.
fn build_path(
    signing: &Cert,
    chain: &[Cert],
    roots: &[Cert],
    files: &BundleFiles,
) -> Result<Vec<Cert>, BundleError> {
    let mut path = vec![signing.clone()];
    loop {
        let current = path.last().expect("path starts non-empty");
        if roots.iter().any(|r| r.der == current.der) {
            // The current cert is itself a trust anchor.
            return Ok(path);
        }
        if path.len() >= MAX_CHAIN_LEN {
            return Err(BundleError::ChainTooLong {
                signing: signing.name(),
                max: MAX_CHAIN_LEN,
            });
        }
        let named: Vec<&Cert> = roots
            .iter()
            .chain(chain.iter())
            .filter(|c| c.subject_raw == current.issuer_raw && c.der != current.der)
            .collect();
        if named.is_empty() {
            return Err(BundleError::IssuerMissing {
                origin: current.origin.to_string(),
                subject: current.name(),
                issuer: current.issuer.clone(),
                chain_file: files.chain_file.clone(),
                root_file: files.root_file.clone(),
            });
        }
        let Some(parent) = named.iter().find(|c| current.is_signed_by(c)) else {
            return Err(BundleError::BadSignature {
                origin: current.origin.to_string(),
                subject: current.name(),
                parent_origin: named[0].origin.to_string(),
                issuer: current.issuer.clone(),
            });
        };
        // Prefer the root-file copy of a root that the chain file repeats.
        let parent = roots.iter().find(|r| r.der == parent.der).unwrap_or(parent);
        path.push(parent.clone());
    }
}

/// Every check on the certificates of the signing path.
fn check_path(path: &[Cert], now: OffsetDateTime) -> Result<(), BundleError> {
    let anchor = path.len() - 1;
    for (i, cert) in path.iter().enumerate() {
        let origin = cert.origin.to_string();
        if cert.is_expired_at(now) {
            return Err(BundleError::Expired {
                origin,
                subject: cert.name(),
                not_after: rfc3339(cert.not_after),
            });
        }
        if cert.is_not_yet_valid_at(now) {
            return Err(BundleError::NotYetValid {
                origin,
                subject: cert.name(),
                not_before: rfc3339(cert.not_before),
            });
        }
        if let Some(path_len) = cert.path_len
            && (path_len as usize) < i
        {
            return Err(BundleError::PathLen {
                origin,
                subject: cert.name(),
                path_len,
                below: i,
            });
        }
        // The anchor's own (self-)signature and extensions are not part of path validation,
        // unless it is also the signing cert.
        if i == anchor && i != 0 {
            continue;
        }
        if !cert.is_ca {
            return Err(BundleError::NotCa {
                origin,
                subject: cert.name(),
            });
        }
        if cert.key_cert_sign == Some(false) {
            return Err(BundleError::NoKeyCertSign {
                origin,
                subject: cert.name(),
            });
        }
        if cert.eku_allows_server_auth == Some(false) {
            return Err(BundleError::EkuWithoutServerAuth {
                origin,
                subject: cert.name(),
            });
        }
        if i != anchor && cert.signature_algorithm.is_weak() {
            return Err(BundleError::WeakSignature {
                origin,
                subject: cert.name(),
                algorithm: cert.signature_algorithm.to_string(),
            });
        }
    }
    Ok(())
}
