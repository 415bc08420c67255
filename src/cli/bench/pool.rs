//! What a run prepares before the clock starts: the CSR pool, the CA bundle
//! and a scratch directory.

use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use crate::ca::CaBundle;
use crate::ca::generate::{self, CaSpec, KeyChoice};
use crate::client::{self, CsrShape};
use crate::identity::TrustDomain;

use super::*;

/// The CA bundle a bench-started server (and the offline ceiling) signs with.
#[derive(Debug, Clone)]
pub enum CaSource {
    Dir(PathBuf),
    /// A fresh root and intermediate, both of this key type.
    Generate(KeyChoice),
}

pub(super) struct Pool {
    pub(super) csrs: Vec<String>,
    /// Service account of entry i (`w<i>`); the CSR names the same identity.
    pub(super) sas: Vec<String>,
    pub(super) stats: PoolStats,
}

/// `n` distinct CSRs, each naming its own identity, built on every core.
pub(super) fn make_pool(
    mix: CsrMix,
    n: usize,
    rsa_keys: usize,
    td: &TrustDomain,
) -> Result<Pool, BenchError> {
    let n = n.max(1);
    let is_rsa = |i: usize| match mix {
        CsrMix::P256 => false,
        CsrMix::Rsa2048 => true,
        CsrMix::Mixed => i % 2 == 1,
    };
    let rsa_count = (0..n).filter(|i| is_rsa(*i)).count();
    let rsa_keys = if rsa_count == 0 {
        0
    } else {
        rsa_keys.clamp(1, rsa_count)
    };
    let rsa: Vec<rcgen::KeyPair> =
        parallel_map(rsa_keys, |_| Ok(client::workload_key(KeyChoice::Rsa2048)?))?;
    let sas: Vec<String> = (0..n).map(|i| format!("w{i}")).collect();
    let csrs = parallel_map(n, |i| {
        let id = format!("spiffe://{td}/ns/{BENCH_NAMESPACE}/sa/{}", sas[i]);
        if is_rsa(i) {
            Ok(client::build_csr(
                &rsa[i % rsa.len()],
                Some(&id),
                CsrShape::Sidecar,
            )?)
        } else {
            let key = client::workload_key(KeyChoice::P256)?;
            Ok(client::build_csr(&key, Some(&id), CsrShape::Ztunnel)?)
        }
    })?;
    Ok(Pool {
        csrs,
        sas,
        stats: PoolStats {
            csrs: n,
            p256_keys: n - rsa_count,
            rsa2048_keys: rsa_keys,
            prepare_s: 0.0,
        },
    })
}

/// `f(0..n)` on every core, results in order.
pub(super) fn parallel_map<T, F>(n: usize, f: F) -> Result<Vec<T>, BenchError>
where
    T: Send,
    F: Fn(usize) -> Result<T, BenchError> + Sync,
{
    if n == 0 {
        return Ok(Vec::new());
    }
    let threads = cores().min(n);
    let chunk = n.div_ceil(threads);
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = out
            .chunks_mut(chunk)
            .enumerate()
            .map(|(c, slots)| {
                s.spawn(move || {
                    for (j, slot) in slots.iter_mut().enumerate() {
                        *slot = Some(f(c * chunk + j)?);
                    }
                    Ok::<(), BenchError>(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| BenchError::Setup("a preparation thread panicked".into()))??;
        }
        Ok::<(), BenchError>(())
    })?;
    Ok(out
        .into_iter()
        .map(|slot| slot.expect("every slot is filled when no thread failed"))
        .collect())
}

/// The bundle directory for `source` (generated into `scratch` when asked) and a label.
pub(super) fn ca_dir(
    source: &CaSource,
    scratch: &ScratchDir,
) -> Result<(PathBuf, String), BenchError> {
    match source {
        CaSource::Dir(d) => Ok((d.clone(), d.display().to_string())),
        CaSource::Generate(key) => {
            let dir = scratch.path().join("cacerts");
            generate_bundle(*key, &dir)?;
            Ok((dir, format!("generated {key} root and intermediate")))
        }
    }
}

/// A root and a plug-in intermediate of `key`'s type, written as Istio's cacerts files.
pub fn generate_bundle(key: KeyChoice, dir: &Path) -> Result<(), BenchError> {
    let now = OffsetDateTime::now_utc();
    let spec = |cn: &str, path_len| CaSpec {
        organization: Some("plugca bench".into()),
        common_name: Some(cn.into()),
        locality: None,
        not_before: now - time::Duration::hours(1),
        not_after: now + time::Duration::days(30),
        path_len,
        dns_sans: Vec::new(),
    };
    let (root_key, ca_key) = std::thread::scope(|s| {
        let a = s.spawn(|| generate::generate_key(key));
        let b = generate::generate_key(key);
        (a.join(), b)
    });
    let root_key =
        root_key.map_err(|_| BenchError::Setup("key generation thread panicked".into()))??;
    let root = generate::self_signed_root(&spec("bench root", None), root_key)?;
    let ca = generate::intermediate(
        &spec("bench intermediate", Some(0)),
        ca_key?,
        &root.cert_der,
        &root.key,
    )?;
    let io = |path: PathBuf| {
        move |e: std::io::Error| BenchError::Io {
            path: path.clone(),
            reason: e.to_string(),
        }
    };
    std::fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
    let chain = format!("{}{}", ca.cert_pem, root.cert_pem);
    for (name, text, secret) in [
        ("ca-cert.pem", ca.cert_pem.as_str(), false),
        ("ca-key.pem", ca.key.secret_pkcs8_pem().as_str(), true),
        ("cert-chain.pem", chain.as_str(), false),
        ("root-cert.pem", root.cert_pem.as_str(), false),
    ] {
        let path = dir.join(name);
        crate::fsutil::write_file(&path, text.as_bytes(), secret).map_err(io(path.clone()))?;
    }
    Ok(())
}

pub(super) fn load_bundle(dir: &Path) -> Result<CaBundle, BenchError> {
    CaBundle::load_dir(dir, OffsetDateTime::now_utc())?.ok_or_else(|| BenchError::NoBundle {
        dir: dir.to_path_buf(),
    })
}

/// A private scratch directory, removed when the run ends.
pub(super) struct ScratchDir(PathBuf);

impl ScratchDir {
    pub(super) fn new() -> Result<Self, BenchError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("plugca-bench-{}-{nanos:09}", std::process::id()));
        let io = |e: std::io::Error| BenchError::Io {
            path: path.clone(),
            reason: e.to_string(),
        };
        std::fs::create_dir(&path).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
        Ok(ScratchDir(path))
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csr::VerifiedCsr;

    #[test]
    fn a_mixed_pool_alternates_key_types_with_distinct_identities() {
        let td = TrustDomain::parse("cluster.local").unwrap();
        let pool = make_pool(CsrMix::Mixed, 4, 1, &td).unwrap();
        assert_eq!(pool.stats.p256_keys, 2);
        assert_eq!(pool.stats.rsa2048_keys, 1);
        let kinds: Vec<String> = pool
            .csrs
            .iter()
            .map(|c| VerifiedCsr::parse(c).unwrap().key_kind().label())
            .collect();
        assert_eq!(kinds, ["p256", "rsa2048", "p256", "rsa2048"]);
        let mut ids: Vec<&String> = pool.sas.iter().collect();
        ids.dedup();
        assert_eq!(ids.len(), 4);
    }
}
