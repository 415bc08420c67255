//! `plugca verify`: the verification section of Istio's "Plugging in existing
//! CA Certificates" task as one command. The task fetches a workload's chain
//! with `openssl s_client -showcerts`, splits it with `sed`, `diff`s cert 2
//! with `ca-cert.pem` and the root with `root-cert.pem`, and runs
//! `openssl verify` on cert 1. Each step here prints PASS or FAIL the same way.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use crate::ca::bundle::{self, BundleError};
use crate::ca::cert::{Cert, Origin, rfc3339};

/// Exit code when a check fails.
pub const EXIT_FAIL: u8 = 1;
/// Exit code when the chain or the plugged files cannot be read.
pub const EXIT_UNREADABLE: u8 = 2;

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// PEM file with the chain a workload presents, leaf first (e.g. saved
    /// `openssl s_client -showcerts` output).
    #[arg(required_unless_present = "connect", conflicts_with = "connect")]
    pub chain: Option<PathBuf>,
    /// Fetch the chain over TLS from host:port instead, like `openssl s_client -showcerts`.
    #[arg(long, value_name = "HOST:PORT")]
    pub connect: Option<String>,
    /// TLS server name (SNI) to send with --connect; default: the host of --connect.
    #[arg(long, requires = "connect")]
    pub server_name: Option<String>,
    /// The plugged cacerts directory (ca-cert.pem, root-cert.pem, cert-chain.pem).
    #[arg(long)]
    pub cacerts_dir: PathBuf,
    /// Seconds to wait for --connect.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
}

/// Why there is nothing to verify (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Read(#[from] BundleError),
    #[error("{source_name}: no certificate found")]
    NoCertificate { source_name: String },
    #[error("{source_name}: certificate {index}: {reason}")]
    BadCertificate {
        source_name: String,
        index: usize,
        reason: String,
    },
    #[error("{dir}: no plugged CA files (ca-cert.pem and root-cert.pem, or tls.crt and ca.crt)")]
    NoPluggedFiles { dir: PathBuf },
    #[error("--connect {0:?}: expected host:port")]
    BadAddress(String),
    #[error("invalid TLS server name {0:?}")]
    BadServerName(String),
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("TLS handshake with {addr} failed before it sent a certificate: {reason}")]
    Handshake { addr: String, reason: String },
}

pub async fn run(args: VerifyArgs) -> ExitCode {
    let presented = match presented_chain(&args).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("plugca verify: {e}");
            return ExitCode::from(EXIT_UNREADABLE);
        }
    };
    let plugged = match Plugged::read(&args.cacerts_dir) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("plugca verify: {e}");
            return ExitCode::from(EXIT_UNREADABLE);
        }
    };
    print_chain(&presented);
    println!(
        "plugged CA in {}: {} ({}), {} root(s) in {}{}",
        args.cacerts_dir.display(),
        plugged.ca_file,
        quoted(&plugged.ca.subject),
        plugged.roots.len(),
        plugged.root_file,
        if plugged.chain.is_empty() {
            String::new()
        } else {
            format!(
                ", {} certificate(s) in {}",
                plugged.chain.len(),
                plugged.chain_file
            )
        }
    );
    println!();
    let steps = check(&presented.certs, &plugged, OffsetDateTime::now_utc());
    for step in &steps {
        println!("{} {}", if step.pass { "PASS" } else { "FAIL" }, step.what);
        for line in &step.detail {
            println!("     {line}");
        }
    }
    let failed = steps.iter().filter(|s| !s.pass).count();
    println!();
    if failed == 0 {
        println!("result: all {} checks passed", steps.len());
        ExitCode::SUCCESS
    } else {
        println!("result: {failed} of {} checks FAILED", steps.len());
        ExitCode::from(EXIT_FAIL)
    }
}

/// One verification step and its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub pass: bool,
    pub what: String,
    pub detail: Vec<String>,
}

impl Step {
    fn pass(what: String) -> Step {
        Step {
            pass: true,
            what,
            detail: Vec::new(),
        }
    }

    fn fail(what: String, detail: Vec<String>) -> Step {
        Step {
            pass: false,
            what,
            detail,
        }
    }
}

/// The plugged CA files that a workload chain is compared with.
#[derive(Debug)]
pub struct Plugged {
    pub ca_file: &'static str,
    pub chain_file: &'static str,
    pub root_file: &'static str,
    /// The signing certificate (first of ca-cert.pem / tls.crt).
    pub ca: Cert,
    /// Other certificates between the signing cert and the roots.
    pub chain: Vec<Cert>,
    pub roots: Vec<Cert>,
}

impl Plugged {
    /// Reads the certificate files of a cacerts directory; the key is not needed.
    pub fn read(dir: &Path) -> Result<Plugged, VerifyError> {
        let tls = dir.join(bundle::TLS_CRT).exists();
        let (ca_file, chain_file, root_file) = if tls {
            (bundle::TLS_CRT, bundle::TLS_CRT, bundle::TLS_CA)
        } else {
            (bundle::CA_CERT, bundle::CERT_CHAIN, bundle::ROOT_CERT)
        };
        if !dir.join(ca_file).exists() || !dir.join(root_file).exists() {
            return Err(VerifyError::NoPluggedFiles {
                dir: dir.to_path_buf(),
            });
        }
        let read = |name: &str, may_be_empty: bool| -> Result<Vec<Cert>, VerifyError> {
            let text = bundle::read_pem_file(&dir.join(name))?;
            Ok(bundle::parse_cert_file(name, &text, may_be_empty)?)
        };
        let mut ca_certs = read(ca_file, false)?.into_iter();
        let ca = ca_certs.next().ok_or(VerifyError::NoCertificate {
            source_name: ca_file.to_string(),
        })?;
        let mut chain: Vec<Cert> = ca_certs.collect();
        if !tls && dir.join(chain_file).exists() {
            chain.extend(read(chain_file, true)?);
        }
        let roots = read(root_file, false)?;
        Ok(Plugged {
            ca_file,
            chain_file,
            root_file,
            ca,
            chain,
            roots,
        })
    }
}

/// The chain a workload presented, and where it came from.
#[derive(Debug)]
pub struct Presented {
    pub source: String,
    pub certs: Vec<Cert>,
    /// A TLS handshake that failed after the certificate arrived.
    pub handshake_note: Option<String>,
}

async fn presented_chain(args: &VerifyArgs) -> Result<Presented, VerifyError> {
    match (&args.connect, &args.chain) {
        (Some(addr), _) => {
            fetch_chain(
                addr,
                args.server_name.as_deref(),
                Duration::from_secs(args.timeout),
            )
            .await
        }
        (None, Some(file)) => {
            let text = bundle::read_pem_file(file)?;
            let source = file.display().to_string();
            let ders = crate::pem::parse_all(&text)
                .map_err(|_| VerifyError::NoCertificate {
                    source_name: source.clone(),
                })?
                .into_iter()
                .filter(|b| b.label == "CERTIFICATE")
                .map(|b| b.der)
                .collect();
            Ok(Presented {
                certs: parse_presented(&source, ders)?,
                source,
                handshake_note: None,
            })
        }
        // clap requires one of the two.
        (None, None) => Err(VerifyError::NoCertificate {
            source_name: "(no input)".into(),
        }),
    }
}

fn parse_presented(source: &str, ders: Vec<Vec<u8>>) -> Result<Vec<Cert>, VerifyError> {
    if ders.is_empty() {
        return Err(VerifyError::NoCertificate {
            source_name: source.to_string(),
        });
    }
    ders.into_iter()
        .enumerate()
        .map(|(index, der)| {
            let text = crate::pem::encode("CERTIFICATE", &der);
            let origin = Origin {
                file: "cert".into(),
                index,
            };
            Cert::parse(der, text, origin).map_err(|e| VerifyError::BadCertificate {
                source_name: source.to_string(),
                index: index + 1,
                reason: e.reason,
            })
        })
        .collect()
}

/// Connects like `openssl s_client -showcerts`: any server certificate is
/// accepted so it can be inspected, but the handshake signature is still
/// checked, so a completed handshake proves the server holds the leaf key.
async fn fetch_chain(
    addr: &str,
    server_name: Option<&str>,
    timeout: Duration,
) -> Result<Presented, VerifyError> {
    let host = host_of(addr).ok_or_else(|| VerifyError::BadAddress(addr.to_string()))?;
    let name = server_name.unwrap_or(host).to_string();
    let server_name =
        ServerName::try_from(name.clone()).map_err(|_| VerifyError::BadServerName(name))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let capture = Arc::new(CaptureChain {
        seen: Mutex::new(Vec::new()),
        provider: provider.clone(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| VerifyError::Handshake {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?
        .dangerous()
        .with_custom_certificate_verifier(capture.clone())
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let connect = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| VerifyError::Connect {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
        Ok::<_, VerifyError>(connector.connect(server_name, tcp).await)
    };
    let handshake =
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| VerifyError::Connect {
                addr: addr.to_string(),
                reason: format!("no TLS handshake within {}s", timeout.as_secs()),
            })??;
    let ders: Vec<Vec<u8>> = capture
        .seen
        .lock()
        .map(|seen| seen.iter().map(|c| c.to_vec()).collect())
        .unwrap_or_default();
    let handshake_note = match &handshake {
        Ok(_) => None,
        Err(e) if !ders.is_empty() => Some(format!(
            "the handshake failed after the certificate was received: {e}"
        )),
        Err(e) => {
            return Err(VerifyError::Handshake {
                addr: addr.to_string(),
                reason: e.to_string(),
            });
        }
    };
    let source = addr.to_string();
    Ok(Presented {
        certs: parse_presented(&source, ders)?,
        source,
        handshake_note,
    })
}

/// The host part of `host:port` or `[v6]:port`.
fn host_of(addr: &str) -> Option<&str> {
    if let Some(rest) = addr.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        return (!port.is_empty()).then_some(host);
    }
    let (host, port) = addr.rsplit_once(':')?;
    (!host.is_empty() && !port.is_empty() && !host.contains(':')).then_some(host)
}

/// Accepts any server certificate and records the chain; handshake
/// signatures are verified with the provider's algorithms.
#[derive(Debug)]
struct CaptureChain {
    seen: Mutex<Vec<CertificateDer<'static>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for CaptureChain {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut seen) = self.seen.lock() {
            *seen = std::iter::once(end_entity)
                .chain(intermediates)
                .map(|c| c.clone().into_owned())
                .collect();
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn print_chain(p: &Presented) {
    println!(
        "chain presented by {} ({} certificate(s)):",
        p.source,
        p.certs.len()
    );
    for (i, c) in p.certs.iter().enumerate() {
        println!("  cert {}: subject {}", i + 1, quoted(&c.subject));
        println!("          issuer  {}", quoted(&c.issuer));
        let sans = sans(&c.der);
        if !sans.is_empty() {
            println!("          SAN     {}", sans.join(", "));
        }
    }
    if let Some(note) = &p.handshake_note {
        println!("  note: {note}");
    }
}

fn quoted(s: &str) -> String {
    if s.is_empty() {
        "<empty>".into()
    } else {
        format!("\"{s}\"")
    }
}

/// Runs the task's checks on a presented chain.
pub fn check(presented: &[Cert], plugged: &Plugged, now: OffsetDateTime) -> Vec<Step> {
    let mut steps = Vec::new();
    let Some(leaf) = presented.first() else {
        return vec![Step::fail(
            "no certificate was presented".into(),
            Vec::new(),
        )];
    };

    // Step: cert 2 is ca-cert.pem (the task: diff ca-cert.pem proxy-cert-2.pem).
    let ca_file = plugged.ca_file;
    steps.push(match presented.get(1) {
        Some(c) if c.der == plugged.ca.der => Step::pass(format!(
            "the CA certificate (cert 2) is the plugged {ca_file}"
        )),
        Some(c) => {
            let mut detail = vec![
                format!("cert 2 is {}", quoted(&c.subject)),
                format!("{ca_file} is {}", quoted(&plugged.ca.subject)),
            ];
            if c.subject_raw == plugged.ca.subject_raw {
                detail.push(
                    "same name, different certificate: another CA with the same subject (re-generated?)"
                        .into(),
                );
            }
            Step::fail(
                format!("the CA certificate (cert 2) is not the plugged {ca_file}"),
                detail,
            )
        }
        None => Step::fail(
            format!("the workload presented only its own certificate, not the plugged {ca_file}"),
            vec![
                "istio-agent and ztunnel present the leaf followed by the CA chain; is this an Istio workload?"
                    .into(),
            ],
        ),
    });

    // Step: the root (the task: diff root-cert.pem proxy-cert-3.pem).
    steps.push(root_step(presented, plugged));

    // Step: the leaf verifies (the task: openssl verify -CAfile <(cat ca-cert.pem root-cert.pem) proxy-cert-1.pem).
    steps.push(path_step(leaf, plugged, now));

    // Step: the leaf is valid now.
    let left = leaf.not_after - now;
    let window = format!(
        "{} to {}",
        rfc3339(leaf.not_before),
        rfc3339(leaf.not_after)
    );
    steps.push(if leaf.is_expired_at(now) {
        Step::fail(
            format!("the workload certificate (cert 1) expired: {window}"),
            Vec::new(),
        )
    } else if leaf.is_not_yet_valid_at(now) {
        Step::fail(
            format!("the workload certificate (cert 1) is not valid yet: {window}"),
            vec!["check this machine's clock, or the CA's".into()],
        )
    } else {
        let left = if left.whole_hours() >= 48 {
            format!("{} days left", left.whole_days())
        } else {
            format!(
                "{}h {}m left",
                left.whole_hours(),
                left.whole_minutes() % 60
            )
        };
        Step::pass(format!(
            "the workload certificate (cert 1) is valid now: {window} ({left})"
        ))
    });

    // Step: the identity.
    let spiffe: Vec<String> = sans(&leaf.der)
        .into_iter()
        .filter_map(|s| s.strip_prefix("URI:").map(String::from))
        .filter(|u| u.starts_with("spiffe://"))
        .collect();
    steps.push(if spiffe.is_empty() {
        Step::fail(
            "the workload certificate (cert 1) has no SPIFFE ID (URI SAN spiffe://...)".into(),
            Vec::new(),
        )
    } else {
        Step::pass(format!(
            "the workload identity (cert 1 URI SAN) is {}",
            spiffe.join(", ")
        ))
    });
    steps
}

fn root_step(presented: &[Cert], plugged: &Plugged) -> Step {
    let root_file = plugged.root_file;
    let n = presented.len();
    let Some(last) = presented.last() else {
        return Step::fail("no certificate was presented".into(), Vec::new());
    };
    let position = |c: &Cert| plugged.roots.iter().position(|r| r.der == c.der);
    if n > 1 && last.self_issued {
        return match position(last) {
            Some(i) => Step::pass(format!(
                "the root certificate (cert {n}) is the plugged {root_file} #{}",
                i + 1
            )),
            None => Step::fail(
                format!("the root certificate (cert {n}) is not in the plugged {root_file}"),
                vec![
                    format!("cert {n} is {}", quoted(&last.subject)),
                    format!(
                        "{root_file} holds {}",
                        plugged
                            .roots
                            .iter()
                            .map(|r| quoted(&r.subject))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ],
            ),
        };
    }
    // No root presented: find the one in root-cert.pem that issued the last cert.
    match plugged
        .roots
        .iter()
        .position(|r| r.subject_raw == last.issuer_raw && last.is_signed_by(r))
    {
        Some(i) => Step::pass(format!(
            "the chain's root (not presented; issuer of cert {n}) is the plugged {root_file} #{}",
            i + 1
        )),
        None => Step::fail(
            format!("no root in the plugged {root_file} issued cert {n}"),
            vec![format!("cert {n} was issued by {}", quoted(&last.issuer))],
        ),
    }
}

fn path_step(leaf: &Cert, plugged: &Plugged, now: OffsetDateTime) -> Step {
    let what = format!(
        "the workload certificate (cert 1) verifies against the plugged {} and {}",
        plugged.ca_file, plugged.root_file
    );
    let anchors: Vec<_> = plugged
        .roots
        .iter()
        .filter_map(|r| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(r.der.as_slice()))
                .ok()
                .map(|a| a.to_owned())
        })
        .collect();
    let intermediates: Vec<CertificateDer<'_>> = std::iter::once(&plugged.ca)
        .chain(plugged.chain.iter())
        .map(|c| CertificateDer::from(c.der.as_slice()))
        .collect();
    let leaf_der = CertificateDer::from(leaf.der.as_slice());
    let ee = match webpki::EndEntityCert::try_from(&leaf_der) {
        Ok(ee) => ee,
        Err(e) => return Step::fail(what, vec![format!("cert 1 is not usable as a leaf: {e}")]),
    };
    let time = UnixTime::since_unix_epoch(Duration::from_secs(
        u64::try_from(now.unix_timestamp()).unwrap_or(0),
    ));
    let mut failures = Vec::new();
    for (name, usage) in [
        ("serverAuth", webpki::KeyUsage::server_auth()),
        ("clientAuth", webpki::KeyUsage::client_auth()),
    ] {
        if let Err(e) = ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            time,
            usage,
            None,
            None,
        ) {
            failures.push(format!("{name}: {e}"));
        }
    }
    if failures.is_empty() {
        Step::pass(format!("{what} (webpki, serverAuth and clientAuth)"))
    } else {
        Step::fail(what, failures)
    }
}

fn sans(der: &[u8]) -> Vec<String> {
    let Ok((_, x)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = x.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => format!("URI:{u}"),
            GeneralName::DNSName(d) => format!("DNS:{d}"),
            other => other.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_splits_host_port_and_bracketed_ipv6() {
        assert_eq!(host_of("127.0.0.1:443"), Some("127.0.0.1"));
        assert_eq!(host_of("httpbin.foo:8000"), Some("httpbin.foo"));
        assert_eq!(host_of("[::1]:15012"), Some("::1"));
        assert_eq!(host_of("httpbin.foo"), None);
        assert_eq!(host_of(":443"), None);
        assert_eq!(host_of("::1:443"), None);
    }
}
