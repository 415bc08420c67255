//! `plugca certs istiod`: istiod's serving certificate as files (`tls.crt`,
//! `tls.key`, `ca.crt`) or as the `istiod-tls` Secret YAML, for setups where
//! plugca has no API access. The same issuance as the in-cluster controller
//! ([`crate::controllers::istiod_tls::issue`]).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use clap::Args;
use time::OffsetDateTime;

use crate::ca::CaBundle;
use crate::controllers::istiod_tls::{self, CA_CRT, IstiodTlsConfig, TLS_CRT, TLS_KEY};
use crate::identity::TrustDomain;

#[derive(Debug, Args)]
pub struct IstiodCertArgs {
    /// The plugged-in CA bundle to issue from.
    #[arg(long, default_value = crate::config::DEFAULT_CACERTS_DIR)]
    pub cacerts_dir: PathBuf,
    /// Output directory for tls.crt, tls.key (mode 0600) and ca.crt; existing files are never overwritten.
    #[arg(long, required_unless_present = "k8s_secret")]
    pub out: Option<PathBuf>,
    /// istiod's namespace.
    #[arg(long, default_value = crate::controllers::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// An istiod revision (adds istiod-<rev>.<ns>.svc); repeatable.
    #[arg(long = "revision")]
    pub revisions: Vec<String>,
    /// An extra DNS name; repeatable.
    #[arg(long = "dns-name")]
    pub dns_names: Vec<String>,
    /// Trust domain of the URI SAN spiffe://<td>/ns/<ns>/sa/istiod.
    #[arg(long, default_value = crate::config::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// PEM roots appended to ca.crt, as `plugca serve --extra-trust-roots`.
    #[arg(long)]
    pub extra_trust_roots: Option<PathBuf>,
    /// Print the istiod-tls Secret (kubernetes.io/tls) as YAML instead of writing files.
    #[arg(long)]
    pub k8s_secret: bool,
}

pub fn run(a: &IstiodCertArgs) -> Result<(), String> {
    let trust_domain = TrustDomain::parse(&a.trust_domain)
        .map_err(|e| format!("--trust-domain {:?}: {e}", a.trust_domain))?;
    let config = IstiodTlsConfig {
        namespace: a.namespace.clone(),
        revisions: a.revisions.clone(),
        extra_dns_names: a.dns_names.clone(),
        trust_domain,
    };
    let now = OffsetDateTime::now_utc();
    let mut bundle = CaBundle::load_dir(&a.cacerts_dir, now)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!(
                "{}: no CA bundle (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem)",
                a.cacerts_dir.display()
            )
        })?;
    if let Some(file) = &a.extra_trust_roots {
        let text = crate::ca::bundle::read_pem_file(file).map_err(|e| e.to_string())?;
        bundle = bundle
            .with_extra_trust_roots(&file.display().to_string(), &text)
            .map_err(|e| e.to_string())?;
    }
    let cert = istiod_tls::issue(&bundle, &config, now).map_err(|e| e.to_string())?;
    if a.k8s_secret {
        print!("{}", secret_yaml(&config.namespace, &cert));
        return Ok(());
    }
    let out = a
        .out
        .as_deref()
        .expect("clap requires --out unless --k8s-secret");
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let existing: Vec<String> = [TLS_CRT, TLS_KEY, CA_CRT]
        .iter()
        .map(|n| out.join(n))
        .filter(|p| p.symlink_metadata().is_ok())
        .map(|p| p.display().to_string())
        .collect();
    if !existing.is_empty() {
        return Err(format!(
            "refusing to overwrite {} (remove them first)",
            existing.join(", ")
        ));
    }
    create_new(&out.join(TLS_KEY), cert.secret_key_pem().as_bytes(), true)?;
    create_new(&out.join(TLS_CRT), cert.tls_crt.as_bytes(), false)?;
    create_new(&out.join(CA_CRT), cert.ca_crt.as_bytes(), false)?;
    println!(
        "wrote {d}/{TLS_CRT}, {d}/{TLS_KEY} and {d}/{CA_CRT} for {sans}; valid until {until}, renew by {renew}",
        d = out.display(),
        sans = config
            .sans()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        until = crate::ca::cert::rfc3339(cert.not_after),
        renew = crate::ca::cert::rfc3339(cert.renew_at()),
    );
    Ok(())
}

/// Creates `path` (never replacing anything); key files get mode 0600 from the start.
fn create_new(path: &Path, contents: &[u8], secret: bool) -> Result<(), String> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut file = options.open(path).map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)
}

fn secret_yaml(namespace: &str, cert: &istiod_tls::IstiodCert) -> String {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {namespace}\ntype: kubernetes.io/tls\ndata:\n  {TLS_CRT}: {}\n  {TLS_KEY}: {}\n  {CA_CRT}: {}\n",
        b64(&cert.tls_crt),
        b64(cert.secret_key_pem()),
        b64(&cert.ca_crt),
        name = istiod_tls::SECRET_NAME,
    )
}
