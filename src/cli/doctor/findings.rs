//! `plugca doctor`'s findings on a cacerts directory: every load check of the
//! server (through [`bundle::inspect`], so the checks exist once), each
//! explained with where it is and how to fix it, plus what the load accepts
//! but deserves a word (duplicate roots, a root repeated in the chain, missing
//! trailing newlines, Istio's public sample CA, near expiry).
//!
//! Errors in a report are exactly the load checks that fail: a report is
//! healthy when `plugca serve` would load the bundle. Warnings and notes never
//! stop a load.

use std::path::{Path, PathBuf};

use ::time::OffsetDateTime;
use serde::Serialize;
use x509_parser::prelude::*;

use crate::ca::bundle::{self, BundleError, BundleFiles, Inspection, Layout, ScannedDir};
use crate::ca::cert::{Cert, rfc3339};
use crate::ca::keys::{CaKey, KeyError};

/// A certificate on the signing path with fewer days left than this is a warning.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// Why there is no report at all (exit code 2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiagnoseError {
    #[error("{dir}: cannot read the directory: {reason}")]
    DirUnreadable { dir: PathBuf, reason: String },
    #[error(
        "{dir}: no CA bundle here (none of ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem or tls.crt); plugca serve stops at start here unless --self-signed is given, then runs on a generated self-signed root"
    )]
    NoBundle { dir: PathBuf },
}

impl DiagnoseError {
    /// Stable identifier for JSON output.
    pub fn code(&self) -> &'static str {
        match self {
            DiagnoseError::DirUnreadable { .. } => "unreadable-directory",
            DiagnoseError::NoBundle { .. } => "no-bundle",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// A load check fails: `plugca serve` refuses the bundle.
    Error,
    /// Loads, but something is likely wrong or will be soon.
    Warning,
    /// Loads; worth knowing.
    Note,
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Note => "note",
        })
    }
}

/// One finding: what is wrong, where, why, and the likely fix.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub severity: Severity,
    /// Stable identifier (`key-mismatch`, `duplicate-root`, ...).
    pub code: &'static str,
    /// The file at fault, if one is.
    pub file: Option<String>,
    /// For errors: the load error exactly as `plugca serve` prints it.
    pub message: String,
    /// What doctor found out about the cause.
    pub detail: Option<String>,
    pub fix: Option<String>,
}

/// The whole report; serialized as-is by `plugca doctor --json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub directory: String,
    pub layout: LayoutReport,
    pub files: Vec<FileReport>,
    pub key: Option<KeyReport>,
    pub certificates: Vec<CertReport>,
    /// From the signing certificate toward the root, as far as it links.
    pub chain: Vec<ChainLink>,
    /// Whether `chain` ends at a root of the root file.
    pub chain_complete: bool,
    /// Why the chain stops short of a root, when it does.
    pub chain_break: Option<String>,
    pub problems: Vec<Problem>,
    /// No errors: `plugca serve` would load this bundle.
    pub healthy: bool,
    /// The error `plugca serve` would refuse the bundle with.
    pub load_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayoutReport {
    /// `istiod` or `kubernetes-tls`.
    pub id: &'static str,
    pub description: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    pub name: &'static str,
    /// What the layout uses the file for.
    pub role: &'static str,
    pub present: bool,
    pub readable: bool,
    pub bytes: Option<usize>,
    /// Labels of its PEM blocks, in order.
    pub pem_blocks: Vec<String>,
    pub trailing_newline: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeyReport {
    pub file: String,
    /// `RSA 2048`, `ECDSA P-256`, ...; `None` when the key did not parse.
    pub key_type: Option<String>,
    /// PEM label the key came from (`RSA PRIVATE KEY` = PKCS#1, `EC PRIVATE KEY` = SEC1, `PRIVATE KEY` = PKCS#8).
    pub format: Option<String>,
    pub ec_parameters_block: bool,
    pub matches_signing_cert: bool,
    /// The certificate (`file #n`) whose public key this is, if any in the directory.
    pub matches_certificate: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CertReport {
    pub file: String,
    /// 1-based position in the file.
    pub index: usize,
    /// `file #n` of an earlier certificate with the same DER.
    pub same_as: Option<String>,
    pub role: String,
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub key_type: Option<String>,
    pub signature_algorithm: String,
    pub weak_signature: bool,
    pub not_before: String,
    pub not_after: String,
    pub days_left: i64,
    pub is_ca: bool,
    pub path_len: Option<u32>,
    /// `None` when there is no keyUsage extension.
    pub key_usage: Option<Vec<&'static str>>,
    pub extended_key_usage: Option<Vec<String>>,
    pub subject_alt_names: Vec<String>,
    pub subject_key_id: Option<String>,
    pub authority_key_id: Option<String>,
    pub self_signed: bool,
    pub sha256: String,
    /// Istio's published sample this certificate is, if it is one.
    pub istio_sample: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChainLink {
    pub certificate: String,
    pub subject: String,
    /// `signing`, `intermediate` or `root`.
    pub role: &'static str,
}

/// A key file other users can read (`plugca serve` warns at start too).
fn key_exposure(keys: &[PathBuf]) -> Vec<Problem> {
    keys.iter()
        .filter_map(|path| {
            let exposure = crate::fsutil::key_exposure(path)?;
            let name = file_name(path);
            Some(problem(
                Severity::Warning,
                "key-readable-by-others",
                Some(&name),
                format!("{name} is readable by other users ({exposure})"),
                Some("anyone who can read the CA key can issue certificates for every workload of the mesh; plugca serve loads it but warns at start".into()),
                Some(format!("`chmod 600 {}` (in Kubernetes: defaultMode 0400 with the pod's fsGroup)", path.display())),
            ))
        })
        .collect()
}

/// Runs every check on `dir` at `now`.
pub fn diagnose(dir: &Path, now: OffsetDateTime) -> Result<Report, DiagnoseError> {
    std::fs::read_dir(dir).map_err(|e| DiagnoseError::DirUnreadable {
        dir: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let scan = bundle::scan_dir(dir).ok_or_else(|| DiagnoseError::NoBundle {
        dir: dir.to_path_buf(),
    })?;
    let layout = LayoutReport {
        id: match scan.layout {
            Layout::Istiod => "istiod",
            Layout::KubernetesTls => "kubernetes-tls",
            Layout::SelfSigned => "self-signed",
        },
        description: scan.layout.to_string(),
    };
    let files = file_reports(&scan);
    let scan_key_files: Vec<PathBuf> = scan
        .files
        .iter()
        .filter(|f| [bundle::CA_KEY, bundle::TLS_KEY].contains(&f.name))
        .map(|f| dir.join(f.name))
        .collect();
    let readable = scan.files.iter().all(|f| f.secret_text().is_ok());
    let mut found = if scan.missing.is_empty() && readable {
        let layout = scan.layout;
        match scan.into_files() {
            Ok(files) => inspected(&files, now),
            // Unreachable after the checks above; report the error rather than panic.
            Err(e) => Findings::errors(vec![e], layout),
        }
    } else {
        partial(&scan, now)
    };
    found.problems.extend(key_exposure(&scan_key_files));
    found.problems.sort_by_key(|p| p.severity);
    let healthy = !found.problems.iter().any(|p| p.severity == Severity::Error);
    Ok(Report {
        directory: dir.display().to_string(),
        layout,
        files,
        key: found.key,
        certificates: found.certificates,
        chain: found.chain,
        chain_complete: found.chain_complete,
        chain_break: found.chain_break,
        problems: found.problems,
        healthy,
        load_error: found.load_error,
    })
}

/// Everything in a report that comes from checking the files.
struct Findings {
    key: Option<KeyReport>,
    certificates: Vec<CertReport>,
    chain: Vec<ChainLink>,
    chain_complete: bool,
    chain_break: Option<String>,
    problems: Vec<Problem>,
    load_error: Option<String>,
}

impl Findings {
    /// Only the given load errors (no inspection possible).
    fn errors(errors: Vec<BundleError>, layout: Layout) -> Findings {
        let ctx = Context::without_path(&[], layout);
        Findings {
            key: None,
            certificates: Vec::new(),
            chain: Vec::new(),
            chain_complete: false,
            chain_break: None,
            problems: errors.iter().map(|e| explain(e, &ctx)).collect(),
            load_error: errors.first().map(ToString::to_string),
        }
    }
}

/// Istio's published sample CA certificates (`samples/certs`) by SHA-256 of
/// their DER; for each sample root, the sample intermediate key published under it.
type Sample = (&'static str, &'static str, Option<&'static str>);
const ISTIO_SAMPLES: &[Sample] = &[
    (
        "f867174e4a31f1792f8c0354a23f8f049bd4019729cd2ee579d67033065b2dc2",
        "samples/certs/ca-cert.pem",
        None,
    ),
    (
        "40ff5d9dcaa80833bb7291ef1f89acd9f4da11d6c6006b78897d3f9e2cff86b5",
        "samples/certs/ca-cert-alt.pem",
        None,
    ),
    (
        "677fbf661531ab421e73bfe7b2ebdb7ec5509174e3dfcd39d24b852e2d46d46c",
        "samples/certs/ca-cert-alt-2.pem",
        None,
    ),
    (
        "63727a1785cab47acec5c24cc0669c20824e8ae1ac28079a4d2f8c830592e7b0",
        "samples/certs/root-cert.pem",
        Some("samples/certs/ca-key.pem (the key of ca-cert.pem)"),
    ),
    (
        "11c9202c6be8ea5fcfb46d8591a8cf83b20eb97ade97234840851af8763ae428",
        "samples/certs/root-cert-alt.pem",
        Some("samples/certs/ca-key-alt.pem (the key of ca-cert-alt.pem)"),
    ),
];

fn istio_sample(der: &[u8]) -> Option<&'static Sample> {
    let fp = sha256_hex(der);
    ISTIO_SAMPLES.iter().find(|(f, _, _)| *f == fp)
}

/// SHA-256 of the public key of Istio's `samples/certs/ca-key-alt-2.pem`, which
/// matches no published certificate (istio/istio#49648).
const ISTIO_SAMPLE_ALT2_KEY: &str =
    "c7f0a47bb7501aa611e32e6de867a576f10ce828a1994f6331f68e214665029d";

fn file_reports(scan: &ScannedDir) -> Vec<FileReport> {
    scan.needed
        .iter()
        .map(|&name| {
            let file = scan.files.iter().find(|f| f.name == name);
            let text = file.and_then(|f| f.secret_text().ok());
            FileReport {
                name,
                role: file_role(name),
                present: file.is_some(),
                readable: text.is_some(),
                bytes: text.map(str::len),
                pem_blocks: text.map(pem_labels).unwrap_or_default(),
                trailing_newline: text.map(|t| t.ends_with('\n')),
            }
        })
        .collect()
}

fn file_role(name: &str) -> &'static str {
    match name {
        bundle::CA_CERT => "signing certificate",
        bundle::CA_KEY | bundle::TLS_KEY => "signing key",
        bundle::CERT_CHAIN => "chain served after the leaf",
        bundle::ROOT_CERT | bundle::TLS_CA => "root bundle (trust anchors)",
        bundle::TLS_CRT => "signing certificate and intermediates",
        _ => "unknown",
    }
}

/// PEM labels by text only, so key material is never decoded here.
fn pem_labels(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("-----BEGIN "))
        .map(|l| l.trim_end_matches('-').to_string())
        .collect()
}

/// A bundle whose files could not all be read: the load errors, plus the
/// certificates of whatever files could be parsed.
fn partial(scan: &ScannedDir, now: OffsetDateTime) -> Findings {
    let mut errors: Vec<BundleError> = scan.incomplete().into_iter().collect();
    errors.extend(
        scan.files
            .iter()
            .filter_map(|f| f.secret_text().err().cloned()),
    );
    let mut certs = Vec::new();
    for file in &scan.files {
        let Ok(text) = file.secret_text() else {
            continue;
        };
        if [bundle::CA_KEY, bundle::TLS_KEY].contains(&file.name) {
            continue;
        }
        match bundle::parse_cert_file(file.name, text, file.name == bundle::CERT_CHAIN) {
            Ok(c) => certs.extend(c),
            Err(e) => errors.push(e),
        }
    }
    let mut found = Findings::errors(errors, scan.layout);
    found.certificates = cert_reports(&certs, &Context::without_path(&certs, scan.layout), now);
    found
}

/// What explanations need to know about the bundle.
struct Context<'a> {
    layout: Layout,
    /// Every certificate of every file, in file order.
    all: Vec<&'a Cert>,
    signing: Option<&'a Cert>,
    roots: &'a [Cert],
    path: &'a [Cert],
    anchored: bool,
    key: Option<&'a CaKey>,
    names: [String; 4],
}

impl<'a> Context<'a> {
    fn without_path(certs: &'a [Cert], layout: Layout) -> Self {
        let names = match layout {
            Layout::KubernetesTls => [
                bundle::TLS_CRT,
                bundle::TLS_KEY,
                bundle::TLS_CRT,
                bundle::TLS_CA,
            ],
            Layout::Istiod | Layout::SelfSigned => [
                bundle::CA_CERT,
                bundle::CA_KEY,
                bundle::CERT_CHAIN,
                bundle::ROOT_CERT,
            ],
        };
        Context {
            layout,
            all: certs.iter().collect(),
            signing: None,
            roots: &[],
            path: &[],
            anchored: false,
            key: None,
            names: names.map(String::from),
        }
    }

    fn of(ins: &'a Inspection, all: Vec<&'a Cert>) -> Self {
        Context {
            layout: ins.layout,
            all,
            signing: ins.signing_file.first(),
            roots: &ins.roots,
            path: &ins.path,
            anchored: ins.path_end.is_ok(),
            key: ins.key.as_ref().ok(),
            names: [
                ins.cert_file.clone(),
                ins.key_file.clone(),
                ins.chain_file.clone(),
                ins.root_file.clone(),
            ],
        }
    }

    fn by_origin(&self, origin: &str) -> Option<&'a Cert> {
        self.all
            .iter()
            .copied()
            .find(|c| c.origin.to_string() == origin)
    }

    /// The first certificate in the directory whose public key is the key's.
    fn key_owner(&self) -> Option<&'a Cert> {
        let key = self.key?;
        self.all
            .iter()
            .copied()
            .find(|c| c.public_key_bits.as_slice() == key.public_key_bits())
    }

    fn root_copy_of(&self, cert: &Cert) -> Option<&'a Cert> {
        self.roots.iter().find(|r| r.der == cert.der)
    }
}

fn inspected(files: &BundleFiles, now: OffsetDateTime) -> Findings {
    let ins = bundle::inspect(files, now);
    let all: Vec<&Cert> = ins
        .signing_file
        .iter()
        .chain(ins.chain.iter())
        .chain(ins.roots.iter())
        .collect();
    let ctx = Context::of(&ins, all);

    let mut problems: Vec<Problem> = ins
        .problems
        .iter()
        .filter(|e| !redundant(e, &ins.problems))
        .map(|e| explain(e, &ctx))
        .collect();
    problems.extend(findings(files, &ins, &ctx, now));

    let certs: Vec<Cert> = ctx.all.iter().map(|c| (*c).clone()).collect();
    Findings {
        key: Some(key_report(&ins, &ctx)),
        certificates: cert_reports(&certs, &ctx, now),
        chain: chain_links(&ins),
        chain_complete: ins.path_end.is_ok(),
        chain_break: ins.path_end.as_ref().err().map(ToString::to_string),
        problems,
        load_error: ins.problems.first().map(ToString::to_string),
    }
}

/// A certificate that is not a CA at all also fails the keyUsage and EKU
/// checks; one explanation is enough.
fn redundant(e: &BundleError, all: &[BundleError]) -> bool {
    match e {
        BundleError::NoKeyCertSign { origin, .. }
        | BundleError::EkuWithoutServerAuth { origin, .. } => all
            .iter()
            .any(|o| matches!(o, BundleError::NotCa { origin: not_ca, .. } if not_ca == origin)),
        _ => false,
    }
}

fn key_report(ins: &Inspection, ctx: &Context) -> KeyReport {
    let key = ins.key.as_ref().ok();
    let owner = ctx.key_owner();
    KeyReport {
        file: ins.key_file.clone(),
        key_type: key.map(|k| k.kind().to_string()),
        format: key.map(|k| k.source_label().to_string()),
        ec_parameters_block: key.is_some_and(CaKey::had_ec_parameters),
        matches_signing_cert: match (key, ctx.signing) {
            (Some(k), Some(s)) => s.public_key_bits.as_slice() == k.public_key_bits(),
            _ => false,
        },
        matches_certificate: owner.map(at),
    }
}

fn chain_links(ins: &Inspection) -> Vec<ChainLink> {
    let last = ins.path.len().saturating_sub(1);
    ins.path
        .iter()
        .enumerate()
        .map(|(i, c)| ChainLink {
            certificate: at(c),
            subject: c.subject.clone(),
            role: if i == last && ins.path_end.is_ok() {
                "root"
            } else if i == 0 {
                "signing"
            } else {
                "intermediate"
            },
        })
        .collect()
}

/// `file #n`, the way every report line names a certificate.
pub fn at(c: &Cert) -> String {
    format!("{} #{}", c.origin.file, c.origin.index + 1)
}

fn subject_of(c: &Cert) -> String {
    if c.subject.is_empty() {
        "<empty subject>".into()
    } else {
        c.subject.clone()
    }
}

fn cert_reports(certs: &[Cert], ctx: &Context, now: OffsetDateTime) -> Vec<CertReport> {
    certs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let extra = Extra::of(&c.der);
            let sha256 = sha256_hex(&c.der);
            CertReport {
                file: c.origin.file.clone(),
                index: c.origin.index + 1,
                same_as: certs[..i].iter().find(|o| o.der == c.der).map(at),
                role: role(c, ctx),
                subject: c.subject.clone(),
                issuer: c.issuer.clone(),
                serial: c.serial_hex.clone(),
                key_type: c.key.map(|k| k.to_string()).or(extra.key_fallback),
                signature_algorithm: c.signature_algorithm.to_string(),
                weak_signature: c.signature_algorithm.is_weak(),
                not_before: rfc3339(c.not_before),
                not_after: rfc3339(c.not_after),
                days_left: (c.not_after - now).whole_days(),
                is_ca: c.is_ca,
                path_len: c.path_len,
                key_usage: extra.key_usage,
                extended_key_usage: extra.extended_key_usage,
                subject_alt_names: extra.sans,
                subject_key_id: c.ski.as_deref().map(hex_id),
                authority_key_id: c.aki.as_deref().map(hex_id),
                self_signed: c.self_issued && c.is_signed_by(c),
                istio_sample: istio_sample(&c.der).map(|(_, name, _)| *name),
                sha256,
            }
        })
        .collect()
}

fn role(c: &Cert, ctx: &Context) -> String {
    let on_path = ctx.path.iter().position(|p| p.der == c.der);
    let last = ctx.path.len().saturating_sub(1);
    match on_path {
        Some(i) if i == last && ctx.anchored && i == 0 => "signing certificate and root".into(),
        Some(i) if i == last && ctx.anchored => "root (trust anchor of the chain)".into(),
        Some(0) => "signing certificate".into(),
        Some(_) => "intermediate".into(),
        None if ctx.roots.iter().any(|r| r.der == c.der) => "root (not on the chain)".into(),
        None if ctx.path.is_empty() => "unchecked".into(),
        None => "not on the chain".into(),
    }
}

/// Display-only facts not kept on [`Cert`].
struct Extra {
    key_usage: Option<Vec<&'static str>>,
    extended_key_usage: Option<Vec<String>>,
    sans: Vec<String>,
    key_fallback: Option<String>,
}

impl Extra {
    fn of(der: &[u8]) -> Extra {
        let mut extra = Extra {
            key_usage: None,
            extended_key_usage: None,
            sans: Vec::new(),
            key_fallback: None,
        };
        let Ok((_, x)) = X509Certificate::from_der(der) else {
            return extra;
        };
        if let Ok(Some(ku)) = x.key_usage() {
            let k = ku.value;
            let names = [
                (k.digital_signature(), "digitalSignature"),
                (k.non_repudiation(), "nonRepudiation"),
                (k.key_encipherment(), "keyEncipherment"),
                (k.data_encipherment(), "dataEncipherment"),
                (k.key_agreement(), "keyAgreement"),
                (k.key_cert_sign(), "keyCertSign"),
                (k.crl_sign(), "cRLSign"),
                (k.encipher_only(), "encipherOnly"),
                (k.decipher_only(), "decipherOnly"),
            ];
            extra.key_usage = Some(
                names
                    .iter()
                    .filter(|(on, _)| *on)
                    .map(|(_, n)| *n)
                    .collect(),
            );
        }
        if let Ok(Some(eku)) = x.extended_key_usage() {
            let e = eku.value;
            let mut names: Vec<String> = [
                (e.any, "any"),
                (e.server_auth, "serverAuth"),
                (e.client_auth, "clientAuth"),
                (e.code_signing, "codeSigning"),
                (e.email_protection, "emailProtection"),
                (e.time_stamping, "timeStamping"),
                (e.ocsp_signing, "OCSPSigning"),
            ]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, n)| n.to_string())
            .collect();
            names.extend(e.other.iter().map(|o| o.to_id_string()));
            extra.extended_key_usage = Some(names);
        }
        if let Ok(Some(san)) = x.subject_alternative_name() {
            extra.sans = san.value.general_names.iter().map(general_name).collect();
        }
        extra.key_fallback = Some(x.public_key().algorithm.algorithm.to_id_string());
        extra
    }
}

fn general_name(n: &GeneralName) -> String {
    match n {
        GeneralName::DNSName(d) => format!("DNS:{d}"),
        GeneralName::URI(u) => format!("URI:{u}"),
        GeneralName::RFC822Name(e) => format!("email:{e}"),
        GeneralName::IPAddress(ip) => match ip.len() {
            4 => format!("IP:{}", std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])),
            16 => {
                let mut b = [0u8; 16];
                b.copy_from_slice(ip);
                format!("IP:{}", std::net::Ipv6Addr::from(b))
            }
            _ => format!("IP:{}", hex_id(ip)),
        },
        other => format!("{other}"),
    }
}

/// Key identifiers like openssl prints them: `AB:01:...`.
fn hex_id(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// SHA-256 like `sha256sum` prints it.
fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn problem(
    severity: Severity,
    code: &'static str,
    file: Option<&str>,
    message: String,
    detail: Option<String>,
    fix: Option<String>,
) -> Problem {
    Problem {
        severity,
        code,
        file: file.map(String::from),
        message,
        detail,
        fix,
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| path.display().to_string())
}

/// A load error, explained. Exhaustive on purpose: a new check needs its own explanation.
fn explain(e: &BundleError, ctx: &Context) -> Problem {
    let message = e.to_string();
    let error = |code: &'static str, file: Option<&str>, detail: Option<String>, fix: String| {
        problem(
            Severity::Error,
            code,
            file,
            message.clone(),
            detail,
            Some(fix),
        )
    };
    let [cert_file, key_file, chain_file, root_file] = &ctx.names;
    let file_of = |origin: &str| {
        ctx.by_origin(origin)
            .map(|c| c.origin.file.clone())
            .unwrap_or_else(|| origin.split(' ').next().unwrap_or(origin).to_string())
    };
    match e {
        BundleError::Incomplete { missing, needed, .. } => error(
            "incomplete-bundle",
            None,
            Some(format!(
                "istiod refuses a partial bundle too (\"incomplete signing CA bundle detected\"); with none of {needed} present, istiod would run a self-signed CA instead, and plugca only with --self-signed"
            )),
            format!(
                "add the missing file(s) ({}) — a cacerts secret needs all of {needed}, e.g. `kubectl create secret generic cacerts -n istio-system --from-file=ca-cert.pem --from-file=ca-key.pem --from-file=root-cert.pem --from-file=cert-chain.pem` — or remove the others and pass --self-signed to run with a self-signed root",
                missing.trim_end_matches(" is").trim_end_matches(" are")
            ),
        ),
        BundleError::Read { file, reason } => {
            let name = file_name(file);
            let fix = if reason.contains("UTF-8") {
                format!(
                    "{name} looks binary (DER?): convert it to PEM, e.g. `openssl x509 -inform der -in {name} -out {name}.new && mv {name}.new {name}` (for a key: `openssl pkey -inform der ...`)"
                )
            } else {
                format!(
                    "make {name} a regular file readable by the user running plugca (in Kubernetes: the secret volume's defaultMode and the pod's fsGroup)"
                )
            };
            error("unreadable-file", Some(&name), None, fix)
        }
        BundleError::NotRegularFile { file, kind } => {
            let name = file_name(file);
            // The same finding as any other unreadable file, with the reason.
            error(
                "unreadable-file",
                Some(&name),
                Some(format!(
                    "it is a {kind}: reading one could block or never end, so plugca refuses it"
                )),
                format!(
                    "make {name} a regular file readable by the user running plugca (in Kubernetes: the secret volume's defaultMode and the pod's fsGroup)"
                ),
            )
        }
        BundleError::TooLarge { file, .. } => {
            let name = file_name(file);
            error(
                "file-too-large",
                Some(&name),
                None,
                format!(
                    "a CA bundle file is a few kilobytes: check that {name} is the file you meant to plug in"
                ),
            )
        }
        BundleError::Pem { file, .. } => {
            let name = file_name(file);
            error(
                "bad-pem",
                Some(&name),
                Some("the PEM text is damaged: a missing END line, mismatched BEGIN/END labels, a copy/paste that lost characters, or encryption headers".into()),
                format!("re-export {name} from its source (check it with `openssl storeutl -noout -text {name}`)"),
            )
        }
        BundleError::NoCertificate { file } => {
            let name = file_name(file);
            error(
                "no-certificate",
                Some(&name),
                None,
                format!("{name} must hold PEM certificates (-----BEGIN CERTIFICATE-----)"),
            )
        }
        BundleError::NotACertificate { file, label, .. } => {
            let name = file_name(file);
            if label.contains("PRIVATE KEY") {
                error(
                    "key-in-certificate-file",
                    Some(&name),
                    Some(format!("{name} holds a private key: the certificate and key files were probably swapped")),
                    format!("put the certificate in {name} and the key in {key_file}; keep keys out of certificate files, which are sent to every workload"),
                )
            } else {
                error(
                    "not-a-certificate",
                    Some(&name),
                    None,
                    format!("remove the \"{label}\" block: {name} may hold only CERTIFICATE blocks (a TRUSTED CERTIFICATE converts with `openssl x509 -in {name} -out {name}`)"),
                )
            }
        }
        BundleError::CertParse { origin, .. } => {
            let name = file_of(origin);
            error(
                "bad-certificate",
                Some(&name),
                None,
                format!("re-export the certificate; `openssl x509 -noout -text -in {name}` shows what openssl makes of it"),
            )
        }
        BundleError::Key { file, error: key_error } => {
            let name = file_name(file);
            explain_key(key_error, &name, cert_file, &message)
        }
        BundleError::KeyMismatch { .. } => explain_mismatch(ctx, &message),
        BundleError::NotCa { origin, .. } => {
            let cert = ctx.by_origin(origin);
            let name = file_of(origin);
            let is_signing = cert.is_some_and(|c| ctx.signing.is_some_and(|s| s.der == c.der));
            if is_signing {
                let leaf = cert.map(describe_leaf).unwrap_or_default();
                let ca = ctx.key_owner().filter(|o| o.is_ca).or_else(|| {
                    ctx.path.get(1).filter(|c| c.is_ca && ctx.path.len() > 2)
                });
                let detail = match ca {
                    Some(ca) => format!(
                        "{cert_file} holds a leaf (workload) certificate{leaf}, not the intermediate CA; the CA that issued it is {} (\"{}\")",
                        at(ca),
                        subject_of(ca)
                    ),
                    None => format!("{cert_file} holds a leaf (workload) certificate{leaf}, not a CA certificate"),
                };
                error(
                    "leaf-as-ca",
                    Some(cert_file),
                    Some(detail),
                    format!("put the intermediate CA certificate in {cert_file} and its key in {key_file} (make a plug-in CA with `plugca certs intermediate` or Istio's tools/certs `make cluster1-cacerts`); a workload certificate cannot sign other certificates"),
                )
            } else {
                error(
                    "not-a-ca",
                    Some(&name),
                    Some(format!("{origin} sits between the signing certificate and the root, so it must be a CA (basicConstraints CA:TRUE)")),
                    format!("remove it from {name} if it does not belong there, or re-issue it as a CA"),
                )
            }
        }
        BundleError::NoKeyCertSign { origin, .. } => error(
            "no-keycertsign",
            Some(&file_of(origin)),
            None,
            "re-issue the CA certificate with keyUsage keyCertSign (for example `keyUsage = critical, keyCertSign, cRLSign, digitalSignature`)".into(),
        ),
        BundleError::EkuWithoutServerAuth { origin, .. } => error(
            "eku-without-server-auth",
            Some(&file_of(origin)),
            Some("an extendedKeyUsage on a CA limits what the certificates below it may be used for; istiod's Go x509.Verify refuses this CA for the same reason".into()),
            "re-issue the CA certificate without extendedKeyUsage, or with serverAuth (and clientAuth) in it".into(),
        ),
        BundleError::WeakSignature { origin, algorithm, .. } => error(
            "weak-signature",
            Some(&file_of(origin)),
            Some(format!("{algorithm} signatures are forgeable; Go (istiod), rustls and browsers refuse them. Istio's tools/certs Makefile produced SHA-1 certificates on macOS for years")),
            "re-issue the certificate with SHA-256: add `-sha256` to `openssl req`/`openssl x509`/`openssl ca`, or use `plugca certs intermediate` (SHA-256/384 only)".into(),
        ),
        BundleError::Expired { origin, .. } => {
            let is_root = ctx.by_origin(origin).is_some_and(|c| ctx.root_copy_of(c).is_some());
            let fix = if is_root {
                "create a new root (`plugca certs root`), re-issue the intermediates from it, and roll it out with both roots in root-cert.pem during the transition".to_string()
            } else {
                "issue a new intermediate (`plugca certs intermediate --root ROOT_DIR --name CLUSTER --out DIR`) and plug the new files in; istiod refuses an expired CA too".to_string()
            };
            error("expired", Some(&file_of(origin)), None, fix)
        }
        BundleError::NotYetValid { origin, not_before, .. } => error(
            "not-yet-valid",
            Some(&file_of(origin)),
            Some("either this machine's clock is behind or the certificate was made with a start date in the future".into()),
            format!("check the clock (`date -u`), or wait until {not_before}"),
        ),
        BundleError::IssuerMissing { origin, issuer, .. } => {
            explain_issuer_missing(ctx, origin, issuer, &message, chain_file, root_file)
        }
        BundleError::BadSignature { origin, parent_origin, .. } => {
            explain_bad_signature(ctx, origin, parent_origin, &message, root_file)
        }
        BundleError::PathLen { origin, path_len, below, .. } => error(
            "pathlen-exceeded",
            Some(&file_of(origin)),
            None,
            format!("{origin} allows {path_len} CA certificate(s) below it but the chain has {below}: re-issue it with a larger pathlen, or sign the intermediates directly from it"),
        ),
        BundleError::ChainTooLong { max, .. } => error(
            "chain-too-long",
            Some(chain_file),
            None,
            format!("keep the chain from {cert_file} to the root at most {max} certificates long"),
        ),
        BundleError::UnsupportedKey { origin, .. } => error(
            "unsupported-certificate-key",
            Some(&file_of(origin)),
            None,
            "issue the CA certificate for an RSA (2048-4096), ECDSA P-256 or P-384 key".into(),
        ),
        BundleError::Signer(_) => error(
            "signer",
            Some(cert_file),
            None,
            "re-issue the CA certificate and key with `plugca certs intermediate`".into(),
        ),
    }
}

fn explain_key(e: &KeyError, name: &str, cert_file: &str, message: &str) -> Problem {
    let error = |code: &'static str, detail: Option<String>, fix: String| {
        problem(
            Severity::Error,
            code,
            Some(name),
            message.to_string(),
            detail,
            Some(fix),
        )
    };
    match e {
        KeyError::Encrypted => error(
            "encrypted-key",
            Some("the key is protected by a passphrase; neither plugca nor istiod can prompt for one".into()),
            format!("decrypt it: `openssl pkey -in {name} -out {name}.plain` (asks for the passphrase), then `mv {name}.plain {name}` and keep it mode 0600"),
        ),
        KeyError::UnsupportedBlock(label) if label == "CERTIFICATE" => error(
            "certificate-in-key-file",
            Some(format!("{name} holds a certificate, not a private key: the certificate and key files were probably swapped or the wrong file was copied")),
            format!("put the private key of {cert_file} in {name}"),
        ),
        KeyError::UnsupportedBlock(label) => error(
            "unsupported-key-format",
            Some(format!("the first key block of {name} is \"{label}\"")),
            format!("convert the key to PKCS#8: `openssl pkey -in {name} -out {name}.pk8 && mv {name}.pk8 {name}`"),
        ),
        KeyError::NoPem => error(
            "no-key",
            None,
            format!("put the PEM private key of {cert_file} in {name}"),
        ),
        KeyError::Pem(_) | KeyError::Malformed { .. } | KeyError::MissingCurve => error(
            "bad-key",
            None,
            format!("re-export the key as PKCS#8: `openssl pkey -in {name} -out {name}.pk8`; if openssl cannot read it either, the file is damaged"),
        ),
        KeyError::UnsupportedCurve(_) | KeyError::UnsupportedKind(_) => error(
            "unsupported-key",
            None,
            "use an RSA 2048-4096, ECDSA P-256 or P-384 CA key (`plugca certs intermediate --key p256|p384|rsa2048|rsa3072|rsa4096`)".into(),
        ),
    }
}

/// Which certificate the key belongs to, and whether the wrong file sits in ca-cert.pem.
fn explain_mismatch(ctx: &Context, message: &str) -> Problem {
    let [cert_file, key_file, ..] = &ctx.names;
    let signing = ctx.signing;
    let owner = ctx.key_owner();
    let signing_is_root = signing.is_some_and(|s| ctx.root_copy_of(s).is_some());
    let signing_is_leaf = signing.is_some_and(|s| !s.is_ca);
    let key_fp = ctx.key.map(|k| sha256_hex(k.public_key_bits()));
    let err = |code, file: &str, detail: String, fix: String| {
        problem(
            Severity::Error,
            code,
            Some(file),
            message.to_string(),
            Some(detail),
            Some(fix),
        )
    };
    match owner {
        Some(owner) if owner.is_ca && (signing_is_leaf || signing_is_root) => {
            let what = if signing_is_leaf {
                format!(
                    "a leaf (workload) certificate{}",
                    signing.map(describe_leaf).unwrap_or_default()
                )
            } else {
                "the root certificate (the same as the one in the root bundle)".to_string()
            };
            err(
                "wrong-signing-certificate",
                cert_file,
                format!(
                    "{cert_file} holds {what}, while {key_file} is the key of {} (\"{}\")",
                    at(owner),
                    subject_of(owner)
                ),
                format!(
                    "put the certificate of {} in {cert_file}: the signing certificate is the intermediate CA whose key is {key_file}",
                    at(owner)
                ),
            )
        }
        Some(owner) => err(
            "key-mismatch",
            key_file,
            format!(
                "{key_file} is the key of {} (\"{}\"), not of {cert_file}",
                at(owner),
                subject_of(owner)
            ),
            format!(
                "plug in the key generated together with {cert_file}, or, if {} is the CA you meant, put its certificate in {cert_file}",
                at(owner)
            ),
        ),
        None if key_fp.as_deref() == Some(ISTIO_SAMPLE_ALT2_KEY) => err(
            "key-mismatch",
            key_file,
            format!(
                "{key_file} is Istio's samples/certs/ca-key-alt-2.pem, which matches no published certificate — not ca-cert-alt-2.pem either (a known upstream mistake; its one user, an ambient rotation test, is skipped: istio/istio#49648). No key exists for ca-cert-alt-2.pem"
            ),
            "use the consistent alt set (ca-cert-alt.pem, ca-key-alt.pem, cert-chain-alt.pem, root-cert-alt.pem) or make a second intermediate with `plugca certs intermediate --name cluster2`".into(),
        ),
        None => err(
            "key-mismatch",
            key_file,
            format!("{key_file} belongs to none of the certificates in this directory"),
            format!(
                "find the key generated with {cert_file}; compare `openssl x509 -noout -pubkey -in {cert_file} | openssl sha256` with `openssl pkey -pubout -in {key_file} | openssl sha256`"
            ),
        ),
    }
}

fn describe_leaf(c: &Cert) -> String {
    let sans = Extra::of(&c.der).sans;
    if sans.is_empty() {
        String::new()
    } else {
        format!(" ({})", sans.join(", "))
    }
}

/// First CN value of a DN string from x509-parser (`CN=Root CA, O=Istio`).
fn common_name(dn: &str) -> Option<&str> {
    dn.split(", ")
        .find_map(|part| part.strip_prefix("CN="))
        .map(str::trim)
}

fn explain_issuer_missing(
    ctx: &Context,
    origin: &str,
    issuer: &str,
    message: &str,
    chain_file: &str,
    root_file: &str,
) -> Problem {
    let cert = ctx.by_origin(origin);
    let name = cert
        .map(|c| c.origin.file.clone())
        .unwrap_or_else(|| origin.to_string());
    let roots: Vec<String> = ctx
        .roots
        .iter()
        .map(|r| format!("\"{}\"", r.subject))
        .collect();
    let err = |code, file: &str, detail: String, fix: String| {
        problem(
            Severity::Error,
            code,
            Some(file),
            message.to_string(),
            Some(detail),
            Some(fix),
        )
    };
    if cert.is_some_and(|c| c.self_issued) {
        return err(
            "root-not-in-root-bundle",
            root_file,
            format!(
                "{origin} is a self-signed root, but {root_file} holds only {}",
                roots.join(", ")
            ),
            format!(
                "add {origin} to {root_file} if it is the root you mean to trust, or replace it with the certificates of the CA you plugged into {root_file}"
            ),
        );
    }
    let same_cn = ctx.roots.iter().find(|r| {
        common_name(&r.subject).is_some() && common_name(&r.subject) == common_name(issuer)
    });
    match same_cn {
        Some(root) => err(
            "root-missing",
            root_file,
            format!(
                "{origin} was issued by \"{issuer}\", but {root_file} holds a different root with the same CN, \"{}\" ({}): the root of another CA was plugged in",
                root.subject,
                at(root)
            ),
            format!(
                "put the root that issued {name} in {root_file} (for Istio's samples: root-cert.pem goes with ca-cert.pem, root-cert-alt.pem with ca-cert-alt.pem)"
            ),
        ),
        None => err(
            "issuer-missing",
            &name,
            format!(
                "{origin} was issued by \"{issuer}\"; no certificate with that subject is in {chain_file} or {root_file} ({root_file} holds {})",
                roots.join(", ")
            ),
            format!(
                "add the issuing CA: intermediates go in {chain_file} after the signing certificate, the root in {root_file}"
            ),
        ),
    }
}

fn explain_bad_signature(
    ctx: &Context,
    origin: &str,
    parent_origin: &str,
    message: &str,
    root_file: &str,
) -> Problem {
    let cert = ctx.by_origin(origin);
    let parent = ctx.by_origin(parent_origin);
    let name = cert
        .map(|c| c.origin.file.clone())
        .unwrap_or_else(|| origin.to_string());
    let mut detail = format!(
        "the issuer name of {origin} is the subject of {parent_origin}, but its signature does not verify with that certificate's key: it was signed by a different CA with the same name (for example a root regenerated with the same O and CN)"
    );
    if let (Some(aki), Some(ski)) = (
        cert.and_then(|c| c.aki.as_deref()),
        parent.and_then(|p| p.ski.as_deref()),
    ) && aki != ski
    {
        detail.push_str(&format!(
            "; its authorityKeyIdentifier {} differs from the subjectKeyIdentifier {} of {parent_origin}",
            hex_id(aki),
            hex_id(ski)
        ));
    }
    if cert.is_some_and(|c| c.self_issued) {
        detail.push_str(&format!(
            "; {origin} is itself a root, and not the one in {root_file}"
        ));
    }
    problem(
        Severity::Error,
        "issuer-name-clash",
        Some(root_file),
        message.to_string(),
        Some(detail),
        Some(format!(
            "put the root that actually signed {name} in {root_file}, or re-issue {name} from the root you plugged in (`plugca certs intermediate --root ROOT_DIR`)"
        )),
    )
}

/// What the load accepts but a user should hear about.
fn findings(
    files: &BundleFiles,
    ins: &Inspection,
    ctx: &Context,
    now: OffsetDateTime,
) -> Vec<Problem> {
    let mut out = Vec::new();
    let [cert_file, key_file, chain_file, root_file] = &ctx.names;
    let warn = |code, file: &str, message: String, detail: Option<String>, fix: Option<String>| {
        problem(Severity::Warning, code, Some(file), message, detail, fix)
    };
    let note = |code, file: &str, message: String, detail: Option<String>| {
        problem(Severity::Note, code, Some(file), message, detail, None)
    };

    // Trailing newlines: only the root bundle reaches clients verbatim.
    if !files.root_pem.is_empty() && !files.root_pem.ends_with('\n') {
        out.push(warn(
            "root-missing-trailing-newline",
            root_file,
            format!("{root_file} does not end with a newline"),
            Some(format!("istiod passes {root_file} through verbatim as the last element of every CreateCertificate response, and plugca does the same for compatibility: workloads receive a root bundle whose last line has no newline, and tools that concatenate PEM files (`cat {root_file} other.pem`) then glue an END and a BEGIN line together")),
            Some(format!("`echo >> {root_file}`")),
        ));
    }
    if ctx.layout == Layout::KubernetesTls
        && !files.signing_pem.is_empty()
        && !files.signing_pem.ends_with('\n')
    {
        out.push(warn(
            "missing-trailing-newline",
            cert_file,
            format!("{cert_file} does not end with a newline"),
            Some(format!("istiod builds the chain by concatenating {cert_file} and {root_file} without a separator, so the END line of the last certificate runs into the next BEGIN line; plugca splits the files per certificate")),
            Some(format!("`echo >> {cert_file}`")),
        ));
    }
    for (file, text) in [
        (cert_file, &files.signing_pem),
        (chain_file, &files.chain_pem),
    ] {
        if ctx.layout == Layout::Istiod && !text.is_empty() && !text.ends_with('\n') {
            out.push(note(
                "missing-trailing-newline",
                file,
                format!("{file} does not end with a newline"),
                Some("harmless: istiod and plugca split it per certificate and end each with a newline".into()),
            ));
        }
    }

    // Duplicate roots.
    for (i, r) in ins.roots.iter().enumerate() {
        if let Some(first) = ins.roots[..i].iter().find(|o| o.der == r.der) {
            out.push(warn(
                "duplicate-root",
                root_file,
                format!("{} is a duplicate of {} (\"{}\")", at(r), at(first), r.subject),
                Some(format!("verification ignores the copy, but {root_file} is sent verbatim, so every workload receives this root twice in its root bundle")),
                Some(format!("delete the repeated certificate from {root_file}")),
            ));
        }
    }
    let distinct_roots = ins
        .roots
        .iter()
        .enumerate()
        .filter(|(i, r)| !ins.roots[..*i].iter().any(|o| o.der == r.der))
        .count();
    if distinct_roots > 1 {
        let chains_to = match (ins.path_end.is_ok(), ins.path.last()) {
            (true, Some(anchor)) => format!(
                "; {cert_file} chains to {} (\"{}\")",
                at(anchor),
                anchor.subject
            ),
            _ => String::new(),
        };
        out.push(note(
            "multiple-roots",
            root_file,
            format!("{root_file} holds {distinct_roots} distinct roots{chains_to}"),
            Some("workloads trust every root in the bundle (a multi-root bundle, as used while rotating roots or joining meshes)".into()),
        ));
    }

    // The chain file as istiod would serve it.
    let chain_certs: Vec<&Cert> = ins
        .signing_file
        .iter()
        .skip(1)
        .chain(ins.chain.iter())
        .collect();
    if let Some(signing) = ctx.signing {
        let anchored = ins.path_end.is_ok();
        if ctx.layout == Layout::Istiod {
            for c in &ins.chain {
                if let Some(root) = ctx.root_copy_of(c) {
                    out.push(note(
                        "root-in-cert-chain",
                        chain_file,
                        format!("{} is the root (the same certificate as {})", at(c), at(root)),
                        Some(format!("Istio's tools/certs Makefile writes {chain_file} this way. istiod sends {chain_file} and then {root_file}, so its workloads receive this root twice; plugca sends only the path below the root, so once")),
                    ));
                }
            }
            let signing_is_root = ctx.root_copy_of(signing).is_some();
            // A leaf in ca-cert.pem is already an error; the chain advice would mislead.
            if signing.is_ca && !signing_is_root && !ins.chain.iter().any(|c| c.der == signing.der)
            {
                out.push(warn(
                    "cert-chain-without-signing-cert",
                    chain_file,
                    format!("{chain_file} does not contain the signing certificate {cert_file}"),
                    Some(format!("istiod sends only {chain_file} between a leaf and the roots, so under istiod workloads would present leaves without their issuer and peers could not verify them; plugca always sends {cert_file}")),
                    Some(format!("`cat {cert_file} > {chain_file}`, then append any intermediates (and, like tools/certs, optionally the root)")),
                ));
            }
        }
        if anchored {
            for c in &chain_certs {
                let on_path = ins.path.iter().any(|p| p.der == c.der);
                // The key's own certificate is the subject of a wrong-signing-cert error already.
                let is_key_owner = ctx.key_owner().is_some_and(|o| o.der == c.der);
                if !on_path
                    && !is_key_owner
                    && ctx.root_copy_of(c).is_none()
                    && c.der != signing.der
                {
                    out.push(warn(
                        "unused-chain-certificate",
                        &c.origin.file,
                        format!("{} (\"{}\") is not on the chain from {cert_file} to the root", at(c), subject_of(c)),
                        Some("istiod sends it to workloads anyway; plugca sends only the certificates on the chain".into()),
                        Some(format!("remove it from {}", c.origin.file)),
                    ));
                }
            }
        }
        if signing.is_ca && signing.ski.is_none() {
            out.push(note(
                "no-subject-key-id",
                cert_file,
                format!("{cert_file} has no subjectKeyIdentifier"),
                Some("with no SKI to copy, istiod issues leaves without an authorityKeyIdentifier (plugca derives one from the CA public key); verifiers then find the issuer by name and signature".into()),
            ));
        }
        if ins.path.len() == 1 && anchored {
            out.push(note(
                "signing-with-root",
                cert_file,
                format!("{cert_file} is a root: workloads are signed directly by it"),
                Some("Istio recommends one intermediate per cluster, so a leaked cluster key can be revoked without replacing the root".into()),
            ));
        }
    }

    // Trusting a sample root trusts whoever holds the published sample intermediate key.
    let sample_roots: Vec<String> = ins
        .roots
        .iter()
        .enumerate()
        .filter(|(i, r)| !ins.roots[..*i].iter().any(|o| o.der == r.der))
        .filter_map(|(_, r)| {
            let (_, name, key) = istio_sample(&r.der)?;
            Some(format!(
                "{} is {name}, and {} is public",
                at(r),
                key.unwrap_or("the key under it")
            ))
        })
        .collect();
    if !sample_roots.is_empty() {
        out.push(warn(
            "istio-sample-ca",
            root_file,
            format!("{root_file} trusts Istio's public sample CA: {}", sample_roots.join("; ")),
            Some("the sample intermediate keys are published in the istio/istio repository, so anyone can mint certificates that workloads trusting this bundle accept. Fine for demos and tests only".into()),
            Some("for a real mesh make your own: `plugca certs root --out root && plugca certs intermediate --root root --name cluster1 --out cacerts`".into()),
        ));
    }

    // Expiry and weak signatures the load does not refuse.
    let anchor_index = ins
        .path_end
        .is_ok()
        .then(|| ins.path.len().saturating_sub(1));
    for (i, c) in ins.path.iter().enumerate() {
        let days = (c.not_after - now).whole_days();
        if !c.is_expired_at(now) && days < EXPIRY_WARNING_DAYS {
            out.push(warn(
                "expiring-soon",
                &c.origin.file,
                format!("{} (\"{}\") expires in {days} day(s), at {}", at(c), subject_of(c), rfc3339(c.not_after)),
                Some("leaves issued from this bundle are cut off at that time, and the bundle stops loading after it".into()),
                Some("renew it now (`plugca certs intermediate` for an intermediate; a new root needs a transition period with both roots in the root bundle)".into()),
            ));
        }
        if anchor_index == Some(i) && c.signature_algorithm.is_weak() {
            out.push(warn(
                "weak-root-signature",
                &c.origin.file,
                format!("{} (\"{}\") is self-signed with {}", at(c), subject_of(c), c.signature_algorithm),
                Some("a trust anchor's own signature is not checked, so it works, but scanners and some tools flag it".into()),
                Some("re-sign the root with SHA-256 (same key and subject): `openssl x509 -in root-cert.pem -signkey root-key.pem -sha256 -out root-cert.pem`".into()),
            ));
        }
    }
    for r in &ins.roots {
        let on_path = ins.path.iter().any(|p| p.der == r.der);
        if !on_path && r.is_expired_at(now) {
            out.push(warn(
                "expired-root",
                root_file,
                format!("{} (\"{}\") expired at {}", at(r), r.subject, rfc3339(r.not_after)),
                Some("it is not on the signing chain, so the bundle loads, but it is still sent to every workload".into()),
                Some(format!("remove it from {root_file}")),
            ));
        }
    }

    if let Ok(key) = &ins.key
        && key.had_ec_parameters()
    {
        out.push(note(
            "ec-parameters-block",
            key_file,
            format!("{key_file} starts with an EC PARAMETERS block (the output of `openssl ecparam -genkey`)"),
            Some(format!("plugca skips it, but istiod refuses this file (\"unsupported PEM block type for a private key: EC PARAMETERS\"); write the key alone before plugging it into istiod: `openssl pkey -in {key_file} -out {key_file}.pk8 && mv {key_file}.pk8 {key_file}`")),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_names_are_read_from_x509_parser_dns() {
        assert_eq!(common_name("O=Istio, CN=Root CA"), Some("Root CA"));
        assert_eq!(
            common_name("C=US, O=Istio, CN=Root CA, emailAddress=x@y"),
            Some("Root CA")
        );
        assert_eq!(common_name("O=Istio"), None);
    }

    #[test]
    fn pem_labels_never_need_the_body() {
        let text = "-----BEGIN EC PARAMETERS-----\nBggq\n-----END EC PARAMETERS-----\n-----BEGIN EC PRIVATE KEY-----\nxx\n-----END EC PRIVATE KEY-----\n";
        assert_eq!(pem_labels(text), ["EC PARAMETERS", "EC PRIVATE KEY"]);
    }

    #[test]
    fn key_ids_print_like_openssl() {
        assert_eq!(hex_id(&[0xab, 0x01]), "AB:01");
    }
}
