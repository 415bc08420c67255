//! `plugca certs`: Istio's `tools/certs` Makefile as one command: a root CA,
//! and per-cluster intermediates written as complete `cacerts` directories.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use time::OffsetDateTime;

use crate::ca::bundle::{self, CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT};
use crate::ca::generate::{self, CaSpec, KeyChoice};
use crate::ca::keys::CaKey;
use crate::fsutil::write_file;

pub const ROOT_KEY: &str = "root-key.pem";

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a self-signed root: root-cert.pem and root-key.pem (mode 0600).
    Root(RootArgs),
    /// Create an intermediate signed by a root: a complete cacerts directory.
    Intermediate(IntermediateArgs),
    /// Issue istiod's serving certificate (tls.crt, tls.key, ca.crt) from a cacerts directory.
    Istiod(crate::cli::istiod_cert::IstiodCertArgs),
}

#[derive(Debug, Args)]
pub struct RootArgs {
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Key type.
    #[arg(long, value_enum, default_value_t = KeyChoice::P256)]
    pub key: KeyChoice,
    /// Validity in days.
    #[arg(long, default_value_t = 3650)]
    pub days: u32,
    /// Organization (O=).
    #[arg(long, default_value = "Istio")]
    pub org: String,
    /// Common name (CN=).
    #[arg(long, default_value = "Root CA")]
    pub cn: String,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct IntermediateArgs {
    /// Directory with root-cert.pem and root-key.pem.
    #[arg(long)]
    pub root: PathBuf,
    /// Cluster name: goes into L= and the printed kubectl command.
    #[arg(long)]
    pub name: String,
    /// Output directory (the cacerts directory).
    #[arg(long)]
    pub out: PathBuf,
    /// Key type.
    #[arg(long, value_enum, default_value_t = KeyChoice::P256)]
    pub key: KeyChoice,
    /// Validity in days (clamped to the root's).
    #[arg(long, default_value_t = 3650)]
    pub days: u32,
    /// Organization (O=).
    #[arg(long, default_value = "Istio")]
    pub org: String,
    /// Common name (CN=).
    #[arg(long, default_value = "Intermediate CA")]
    pub cn: String,
    /// DNS SAN of the intermediate (Istio's Makefile uses istiod's name).
    #[arg(long, default_value = "istiod.istio-system.svc")]
    pub san_dns: String,
    /// Print the cacerts Secret as YAML instead of writing files.
    #[arg(long)]
    pub k8s_secret: bool,
    /// Namespace of the printed Secret and kubectl command.
    #[arg(long, default_value = "istio-system")]
    pub namespace: String,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
}

pub fn run(cmd: CertsCommand) -> Result<(), String> {
    match cmd {
        CertsCommand::Root(a) => root(&a),
        CertsCommand::Intermediate(a) => intermediate(&a),
        CertsCommand::Istiod(a) => crate::cli::istiod_cert::run(&a),
    }
}

fn root(a: &RootArgs) -> Result<(), String> {
    refuse_overwrite(&a.out, &[ROOT_CERT, ROOT_KEY], a.force)?;
    let now = OffsetDateTime::now_utc();
    let key = generate::generate_key(a.key).map_err(|e| e.to_string())?;
    let root = generate::self_signed_root(
        &CaSpec {
            organization: Some(a.org.clone()),
            common_name: Some(a.cn.clone()),
            locality: None,
            not_before: now,
            not_after: now + time::Duration::days(a.days.into()),
            path_len: None,
            dns_sans: Vec::new(),
        },
        key,
    )
    .map_err(|e| e.to_string())?;
    write_all(
        &a.out,
        &[
            (ROOT_CERT, root.cert_pem.as_str(), false),
            (ROOT_KEY, root.key.secret_pkcs8_pem().as_str(), true),
        ],
    )?;
    println!(
        "wrote {}/{ROOT_CERT} and {}/{ROOT_KEY} ({})",
        a.out.display(),
        a.out.display(),
        a.key
    );
    Ok(())
}

fn intermediate(a: &IntermediateArgs) -> Result<(), String> {
    if !a.k8s_secret {
        refuse_overwrite(&a.out, &[CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT], a.force)?;
    }
    let root_cert_pem =
        bundle::read_pem_file(&a.root.join(ROOT_CERT)).map_err(|e| e.to_string())?;
    let root_key_pem = bundle::read_pem_file(&a.root.join(ROOT_KEY)).map_err(|e| e.to_string())?;
    let root_key = CaKey::ca_from_pem(&root_key_pem)
        .map_err(|e| format!("{}: {e}", a.root.join(ROOT_KEY).display()))?;
    let root_block = crate::pem::parse_all(&root_cert_pem)
        .map_err(|e| format!("{}: {e}", a.root.join(ROOT_CERT).display()))?
        .remove(0);
    let root_cert = crate::ca::cert::Cert::parse(
        root_block.der.clone(),
        root_block.text.clone(),
        crate::ca::cert::Origin {
            file: ROOT_CERT.into(),
            index: 0,
        },
    )
    .map_err(|e| format!("{}: {e}", a.root.join(ROOT_CERT).display()))?;
    if root_key.public_key_bits() != root_cert.public_key_bits.as_slice() {
        return Err(format!(
            "{} is not the key of {}",
            a.root.join(ROOT_KEY).display(),
            a.root.join(ROOT_CERT).display()
        ));
    }
    let now = OffsetDateTime::now_utc();
    let wanted = now + time::Duration::days(a.days.into());
    let key = generate::generate_key(a.key).map_err(|e| e.to_string())?;
    let ca = generate::intermediate(
        &CaSpec {
            organization: Some(a.org.clone()),
            common_name: Some(a.cn.clone()),
            locality: Some(a.name.clone()),
            not_before: now,
            not_after: wanted.min(root_cert.not_after),
            path_len: Some(0),
            dns_sans: vec![a.san_dns.clone()],
        },
        key,
        &root_block.der,
        &root_key,
    )
    .map_err(|e| e.to_string())?;
    let root_text = format!("{}\n", root_block.text);
    let chain = format!("{}{}", ca.cert_pem, root_text);
    let key_pem = ca.key.secret_pkcs8_pem();
    if a.k8s_secret {
        print!(
            "{}",
            secret_yaml(&a.namespace, &ca.cert_pem, &key_pem, &chain, &root_text)
        );
        return Ok(());
    }
    write_all(
        &a.out,
        &[
            (CA_CERT, ca.cert_pem.as_str(), false),
            (CA_KEY, key_pem.as_str(), true),
            (CERT_CHAIN, chain.as_str(), false),
            (ROOT_CERT, root_text.as_str(), false),
        ],
    )?;
    let d = a.out.display();
    println!(
        "wrote the cacerts directory {d} ({}, cluster {})",
        a.key, a.name
    );
    println!(
        "plug it into Istio with:\n  kubectl create secret generic cacerts -n {ns} \\\n    --from-file={d}/ca-cert.pem --from-file={d}/ca-key.pem \\\n    --from-file={d}/root-cert.pem --from-file={d}/cert-chain.pem",
        ns = a.namespace
    );
    Ok(())
}

fn refuse_overwrite(dir: &Path, names: &[&str], force: bool) -> Result<(), String> {
    if force {
        return Ok(());
    }
    let existing: Vec<String> = names
        .iter()
        .map(|n| dir.join(n))
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if existing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "refusing to overwrite {} (use --force)",
            existing.join(", ")
        ))
    }
}

fn write_all(dir: &Path, files: &[(&str, &str, bool)]) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for (name, contents, secret) in files {
        let path = dir.join(name);
        write_file(&path, contents.as_bytes(), *secret)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn secret_yaml(namespace: &str, cert: &str, key: &str, chain: &str, root: &str) -> String {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: cacerts\n  namespace: {namespace}\ntype: Opaque\ndata:\n  ca-cert.pem: {}\n  ca-key.pem: {}\n  cert-chain.pem: {}\n  root-cert.pem: {}\n",
        b64(cert),
        b64(key),
        b64(chain),
        b64(root)
    )
}
