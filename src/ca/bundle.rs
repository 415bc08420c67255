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
/// Every file name of either layout.
pub const BUNDLE_FILES: &[&str] = &[
    CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT, TLS_CRT, TLS_KEY, TLS_CA,
];

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
    #[error("{file}: is a {kind}, not a regular file (bundle files must be regular files)")]
    NotRegularFile { file: PathBuf, kind: &'static str },
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

/// The files of a bundle, read but not yet checked. `Debug` elides the key.
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

impl std::fmt::Debug for BundleFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleFiles")
            .field("layout", &self.layout)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("chain_file", &self.chain_file)
            .field("root_file", &self.root_file)
            .field("key_pem", &"[elided]")
            .finish_non_exhaustive()
    }
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
    /// Roots from `--extra-trust-roots`, appended to the last response element.
    extra_roots: Vec<Cert>,
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

    /// Checks a bundle and prepares it for signing. Refuses it with the first
    /// problem [`inspect`] finds.
    pub fn from_files(files: BundleFiles, now: OffsetDateTime) -> Result<Self, BundleError> {
        let Inspection {
            layout,
            key,
            path,
            path_end,
            roots,
            problems,
            ..
        } = inspect(&files, now);
        if let Some(first) = problems.into_iter().next() {
            return Err(first);
        }
        // With no problems recorded the key parsed and the path reached a root:
        // a failure of either is always recorded as a problem.
        let key = key?;
        path_end?;
        let signing = path
            .first()
            .expect("a path starts at the signing cert")
            .clone();

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
            layout,
            signer,
            signing,
            path,
            roots,
            response_tail,
            root_bundle: files.root_pem,
            extra_roots: Vec::new(),
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

    /// Appends extra trust roots (an old root during rotation, a peer cluster's
    /// root) to the last response element, so clients trust them too.
    pub fn with_extra_trust_roots(mut self, file: &str, text: &str) -> Result<Self, BundleError> {
        if text.trim().is_empty() {
            return Ok(self);
        }
        let blocks = cert_blocks(file, text, false)?;
        let certs = parse_certs(file, blocks)?;
        let last = self
            .response_tail
            .last_mut()
            .expect("the response tail always ends with the root bundle");
        for cert in &certs {
            if self.roots.iter().any(|r| r.der == cert.der) {
                continue;
            }
            if !last.is_empty() && !last.ends_with('\n') {
                last.push('\n');
            }
            last.push_str(&cert.text);
            last.push('\n');
        }
        self.extra_roots = certs;
        Ok(self)
    }

    /// DER of every root in the bundle (for rotation rules).
    pub fn root_ders(&self) -> Vec<Vec<u8>> {
        self.roots.iter().map(|r| r.der.clone()).collect()
    }

    /// Whether `other` would serve and sign exactly like `self`.
    pub fn same_material(&self, other: &CaBundle) -> bool {
        self.signing.der == other.signing.der
            && self.response_tail == other.response_tail
            && self.signer.key_id_hex() == other.signer.key_id_hex()
            && self.signer.public_key_bits() == other.signer.public_key_bits()
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
    scan_dir(dir).map(ScannedDir::into_files).transpose()
}

/// A bundle file found in a directory: its text, or why it could not be read.
pub struct ScannedFile {
    pub name: &'static str,
    text: Result<zeroize::Zeroizing<String>, BundleError>,
}

impl ScannedFile {
    /// The file's text. Named `secret` because the key file goes through here too.
    pub fn secret_text(&self) -> Result<&str, &BundleError> {
        self.text.as_ref().map(|t| t.as_str())
    }
}

impl std::fmt::Debug for ScannedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScannedFile")
            .field("name", &self.name)
            .field("text", &self.text.as_ref().map(|_| "[elided]"))
            .finish()
    }
}

/// The bundle files of a directory, detected and read but not yet checked.
#[derive(Debug)]
pub struct ScannedDir {
    pub dir: PathBuf,
    pub layout: Layout,
    /// The files the layout needs, in load order.
    pub needed: &'static [&'static str],
    /// Needed files that do not exist.
    pub missing: Vec<&'static str>,
    /// The needed files that exist, in load order.
    pub files: Vec<ScannedFile>,
}

/// Detects the layout in `dir` and reads every bundle file present, keeping
/// each read error. `None` if no bundle file exists (self-signed mode).
pub fn scan_dir(dir: &Path) -> Option<ScannedDir> {
    const TLS: &[&str] = &[TLS_CRT, TLS_KEY, TLS_CA];
    const ISTIOD: &[&str] = &[CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT];
    let exists = |name: &str| dir.join(name).exists();
    let (layout, needed) = if exists(TLS_CRT) {
        (Layout::KubernetesTls, TLS)
    } else if ISTIOD.iter().any(|n| exists(n)) {
        (Layout::Istiod, ISTIOD)
    } else {
        return None;
    };
    let (present, missing): (Vec<&'static str>, Vec<&'static str>) =
        needed.iter().partition(|n| exists(n));
    let files = present
        .into_iter()
        .map(|name| ScannedFile {
            name,
            text: read_pem_file(&dir.join(name)).map(zeroize::Zeroizing::new),
        })
        .collect();
    Some(ScannedDir {
        dir: dir.to_path_buf(),
        layout,
        needed,
        missing,
        files,
    })
}

impl ScannedDir {
    /// The error for a partial bundle, if files are missing.
    pub fn incomplete(&self) -> Option<BundleError> {
        if self.missing.is_empty() {
            return None;
        }
        let present: Vec<&str> = self.files.iter().map(|f| f.name).collect();
        Some(BundleError::Incomplete {
            dir: self.dir.clone(),
            present: present.join(", "),
            missing: format!(
                "{} {}",
                self.missing.join(", "),
                if self.missing.len() == 1 { "is" } else { "are" }
            ),
            needed: self.needed.join(", "),
        })
    }

    /// The files for [`CaBundle::from_files`]: the incomplete-bundle error
    /// first, then the first read error in load order.
    pub fn into_files(self) -> Result<BundleFiles, BundleError> {
        if let Some(e) = self.incomplete() {
            return Err(e);
        }
        let mut texts = Vec::with_capacity(self.files.len());
        for file in self.files {
            texts.push(file.text?);
        }
        let mut texts = texts.into_iter();
        let mut next = || {
            texts
                .next()
                .map(|mut t| std::mem::take(&mut *t))
                .unwrap_or_default()
        };
        Ok(match self.layout {
            Layout::KubernetesTls => {
                let cert = next();
                let key = zeroize::Zeroizing::new(next());
                let ca = next();
                BundleFiles::new(
                    Layout::KubernetesTls,
                    [TLS_CRT, TLS_KEY, TLS_CRT, TLS_CA],
                    cert,
                    key,
                    String::new(),
                    ca,
                )
            }
            Layout::Istiod | Layout::SelfSigned => {
                let cert = next();
                let key = zeroize::Zeroizing::new(next());
                let chain = next();
                let root = next();
                BundleFiles::new(
                    Layout::Istiod,
                    [CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT],
                    cert,
                    key,
                    chain,
                    root,
                )
            }
        })
    }
}

/// Reads a PEM file with a size bound, naming the file in every error. Only
/// regular files are read (symlinks such as Kubernetes' `..data` ones are
/// followed): a FIFO or device would block or never end. The file is opened
/// non-blocking and checked again on the open descriptor, so one swapped in
/// between the check and the open cannot block either.
pub fn read_pem_file(path: &Path) -> Result<String, BundleError> {
    use std::io::Read as _;
    let read_err = |e: std::io::Error| BundleError::Read {
        file: path.to_path_buf(),
        reason: e.to_string(),
    };
    let regular = |meta: &std::fs::Metadata| {
        if meta.is_file() {
            Ok(())
        } else {
            Err(BundleError::NotRegularFile {
                file: path.to_path_buf(),
                kind: file_kind(meta.file_type()),
            })
        }
    };
    regular(&std::fs::metadata(path).map_err(read_err)?)?;
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(read_err)?;
    regular(&file.metadata().map_err(read_err)?)?;
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

/// What a non-regular file is, for [`BundleError::NotRegularFile`].
fn file_kind(t: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        if t.is_fifo() {
            return "named pipe (FIFO)";
        }
        if t.is_socket() {
            return "socket";
        }
        if t.is_block_device() || t.is_char_device() {
            return "device";
        }
    }
    if t.is_dir() {
        "directory"
    } else {
        "special file"
    }
}

/// Parses the certificates of a bundle file. An empty file is allowed only
/// when `may_be_empty` (a chain file); any non-CERTIFICATE block is an error.
pub fn parse_cert_file(
    file: &str,
    text: &str,
    may_be_empty: bool,
) -> Result<Vec<Cert>, BundleError> {
    cert_blocks(file, text, may_be_empty).and_then(|blocks| parse_certs(file, blocks))
}

/// Everything the load checks found in a bundle, for reports (`plugca doctor`).
pub struct Inspection {
    pub layout: Layout,
    pub cert_file: String,
    pub key_file: String,
    pub chain_file: String,
    pub root_file: String,
    /// Certificates of the signing-cert file (the first is the signing cert);
    /// empty when the file did not parse.
    pub signing_file: Vec<Cert>,
    /// Certificates of the chain file (empty in the TLS layout).
    pub chain: Vec<Cert>,
    pub roots: Vec<Cert>,
    pub key: Result<CaKey, BundleError>,
    /// From the signing cert toward a root, as far as it could be built
    /// (empty when a certificate file did not parse).
    pub path: Vec<Cert>,
    /// `Ok` when `path` ends at a certificate of the root file, else why not.
    pub path_end: Result<(), BundleError>,
    /// Every failed check, in the order the load meets them: the bundle loads
    /// exactly when this is empty, and the server refuses it with the first.
    pub problems: Vec<BundleError>,
}

impl std::fmt::Debug for Inspection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inspection")
            .field("layout", &self.layout)
            .field("path", &self.path.len())
            .field("problems", &self.problems)
            .finish()
    }
}

/// Runs every load check on `files`, recording each failure instead of
/// stopping at the first. Later checks that need an earlier result (the path
/// needs every certificate file) are skipped when it is missing.
pub fn inspect(files: &BundleFiles, now: OffsetDateTime) -> Inspection {
    let mut problems = Vec::new();
    let mut certs_of = |file: &str, text: &str, may_be_empty: bool| {
        parse_cert_file(file, text, may_be_empty).unwrap_or_else(|e| {
            problems.push(e);
            Vec::new()
        })
    };
    let signing_file = certs_of(&files.cert_file, &files.signing_pem, false);
    let chain = certs_of(&files.chain_file, &files.chain_pem, true);
    let roots = certs_of(&files.root_file, &files.root_pem, false);
    let certs_parsed = problems.is_empty();

    let key = CaKey::ca_from_pem(&files.key_pem).map_err(|error| BundleError::Key {
        file: PathBuf::from(&files.key_file),
        error,
    });
    if let Err(e) = &key {
        problems.push(e.clone());
    }
    if let Some(signing) = signing_file.first() {
        if signing.key.is_none() {
            problems.push(BundleError::UnsupportedKey {
                origin: signing.origin.to_string(),
                reason: "not RSA, ECDSA P-256/P-384 or Ed25519".into(),
            });
        } else if let Ok(key) = &key
            && key.public_key_bits() != signing.public_key_bits.as_slice()
        {
            problems.push(BundleError::KeyMismatch {
                cert_file: files.cert_file.clone(),
                key_file: files.key_file.clone(),
                subject: signing.name(),
            });
        }
    }

    let (path, path_end) = match signing_file.split_first() {
        Some((signing, more)) if certs_parsed => {
            // In the TLS layout tls.crt may carry intermediates after the signing cert.
            let intermediates: Vec<Cert> = more.iter().chain(chain.iter()).cloned().collect();
            let (path, end) = build_path(signing, &intermediates, &roots, files);
            if let Err(e) = &end {
                problems.push(e.clone());
            }
            for problem in path_problems(&path, end.is_ok(), now) {
                // A weak signature that ended the path is found again here: report it once.
                if !problems.contains(&problem) {
                    problems.push(problem);
                }
            }
            (path, end)
        }
        _ => {
            // Only reached with a parse problem recorded; report the first as the reason.
            let reason = problems
                .first()
                .cloned()
                .unwrap_or(BundleError::NoCertificate {
                    file: PathBuf::from(&files.cert_file),
                });
            (Vec::new(), Err(reason))
        }
    };

    Inspection {
        layout: files.layout,
        cert_file: files.cert_file.clone(),
        key_file: files.key_file.clone(),
        chain_file: files.chain_file.clone(),
        root_file: files.root_file.clone(),
        signing_file,
        chain,
        roots,
        key,
        path,
        path_end,
        problems,
    }
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
/// Returns the path as far as it got and, if it did not reach a root, why.
fn build_path(
    signing: &Cert,
    chain: &[Cert],
    roots: &[Cert],
    files: &BundleFiles,
) -> (Vec<Cert>, Result<(), BundleError>) {
    let mut path = vec![signing.clone()];
    loop {
        let current = path.last().expect("path starts non-empty");
        if roots.iter().any(|r| r.der == current.der) {
            // The current cert is itself a trust anchor.
            return (path, Ok(()));
        }
        if path.len() >= MAX_CHAIN_LEN {
            let error = BundleError::ChainTooLong {
                signing: signing.name(),
                max: MAX_CHAIN_LEN,
            };
            return (path, Err(error));
        }
        let named: Vec<&Cert> = roots
            .iter()
            .chain(chain.iter())
            .filter(|c| c.subject_raw == current.issuer_raw && c.der != current.der)
            .collect();
        if named.is_empty() {
            let error = BundleError::IssuerMissing {
                origin: current.origin.to_string(),
                subject: current.name(),
                issuer: current.issuer.clone(),
                chain_file: files.chain_file.clone(),
                root_file: files.root_file.clone(),
            };
            return (path, Err(error));
        }
        let Some(parent) = named.iter().find(|c| current.is_signed_by(c)) else {
            // MD5 and SHA-1 signatures are not always verifiable (ecdsa-with-SHA1
            // never is): then the weak algorithm is the problem, not another key.
            let error = if current.signature_algorithm.is_weak() {
                BundleError::WeakSignature {
                    origin: current.origin.to_string(),
                    subject: current.name(),
                    algorithm: current.signature_algorithm.to_string(),
                }
            } else {
                BundleError::BadSignature {
                    origin: current.origin.to_string(),
                    subject: current.name(),
                    parent_origin: named[0].origin.to_string(),
                    issuer: current.issuer.clone(),
                }
            };
            return (path, Err(error));
        };
        // Prefer the root-file copy of a root that the chain file repeats.
        let parent = roots.iter().find(|r| r.der == parent.der).unwrap_or(parent);
        path.push(parent.clone());
    }
}

/// Every check on the certificates of the signing path, in order; the path
/// is `anchored` when its last certificate is from the root file.
fn path_problems(path: &[Cert], anchored: bool, now: OffsetDateTime) -> Vec<BundleError> {
    let anchor = anchored.then(|| path.len().saturating_sub(1));
    let mut problems = Vec::new();
    for (i, cert) in path.iter().enumerate() {
        let origin = cert.origin.to_string();
        if cert.is_expired_at(now) {
            problems.push(BundleError::Expired {
                origin: origin.clone(),
                subject: cert.name(),
                not_after: rfc3339(cert.not_after),
            });
        } else if cert.is_not_yet_valid_at(now) {
            problems.push(BundleError::NotYetValid {
                origin: origin.clone(),
                subject: cert.name(),
                not_before: rfc3339(cert.not_before),
            });
        }
        if let Some(path_len) = cert.path_len
            && (path_len as usize) < i
        {
            problems.push(BundleError::PathLen {
                origin: origin.clone(),
                subject: cert.name(),
                path_len,
                below: i,
            });
        }
        // The anchor's own (self-)signature and extensions are not part of path validation,
        // unless it is also the signing cert.
        if anchor == Some(i) && i != 0 {
            continue;
        }
        if !cert.is_ca {
            problems.push(BundleError::NotCa {
                origin: origin.clone(),
                subject: cert.name(),
            });
        }
        if cert.key_cert_sign == Some(false) {
            problems.push(BundleError::NoKeyCertSign {
                origin: origin.clone(),
                subject: cert.name(),
            });
        }
        if cert.eku_allows_server_auth == Some(false) {
            problems.push(BundleError::EkuWithoutServerAuth {
                origin: origin.clone(),
                subject: cert.name(),
            });
        }
        if anchor != Some(i) && cert.signature_algorithm.is_weak() {
            problems.push(BundleError::WeakSignature {
                origin,
                subject: cert.name(),
                algorithm: cert.signature_algorithm.to_string(),
            });
        }
    }
    problems
}
