//! The self-signed root kept in a Secret every replica shares (issue 10 item
//! 3), like istiod's `istio-ca-secret`: `--self-signed-secret <ns>/<name>`.
//!
//! - At start (only when no bundle is plugged in): read the Secret; when it is
//!   absent, generate a root and create the Secret, create-only. A 409
//!   AlreadyExists means another replica won the race: read theirs and use it.
//!   An existing Secret is never overwritten; bad contents stop the start with
//!   an error naming the Secret and the key.
//! - While serving ([`keep_in_sync`]): re-read it every `--reload-interval`
//!   and adopt a different valid root (an operator replaced it), so replicas
//!   agree; a deleted Secret is re-created with the root serving now, so a
//!   restarted replica finds it instead of minting another root. Bad contents
//!   are logged and counted; the serving root stays.
//! - No automatic renewal: that would overwrite the Secret, and two replicas
//!   renewing at once would disagree. The expiry warning (`--expiry-warning`)
//!   says when to replace it (docs/istio-with-plugca.md).
//!
//! Keys as istiod's `istio-ca-secret` (`security/pkg/pki/ca/ca.go`):
//! `ca-cert.pem`, `ca-key.pem`, `root-cert.pem` (the same root), and empty
//! `cert-chain.pem` and `key.pem`; type `istio.io/ca-root`. Only `ca-cert.pem`
//! and `ca-key.pem` are read, as istiod does.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::{error, info, instrument, warn};

use crate::ca::bundle::{BundleFiles, CaBundle, Layout};
use crate::ca::selfsigned::{self, SelfSignedError, SelfSignedSpec};
use crate::controllers::metrics::{Controller, ControllerMetrics, ErrorKind, WriteKind};
use crate::controllers::{MANAGED_BY_LABEL, MANAGED_BY_VALUE, stopped};
use crate::reload::Reloader;

pub const CA_CERT_KEY: &str = "ca-cert.pem";
pub const CA_KEY_KEY: &str = "ca-key.pem";
pub const ROOT_CERT_KEY: &str = "root-cert.pem";
/// Written empty, as istiod does (a self-signed root has no chain).
pub const CERT_CHAIN_KEY: &str = "cert-chain.pem";
pub const PRIVATE_KEY_KEY: &str = "key.pem";
/// istiod's type for `istio-ca-secret`.
pub const SECRET_TYPE: &str = "istio.io/ca-root";

/// `<namespace>/<name>` of the Secret (`--self-signed-secret`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
}

impl SecretRef {
    /// Strict: a namespace (DNS label) and a Secret name (DNS subdomain).
    pub fn parse(s: &str) -> Result<SecretRef, String> {
        let Some((namespace, name)) = s.trim().split_once('/') else {
            return Err("not namespace/name (e.g. istio-system/plugca-root)".into());
        };
        if !is_dns_label(namespace) {
            return Err(format!("namespace {namespace:?} is not a DNS label"));
        }
        if name.len() > 253 || !name.split('.').all(is_dns_label) {
            return Err(format!("Secret name {name:?} is not a DNS subdomain"));
        }
        Ok(SecretRef {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[derive(Debug, thiserror::Error)]
pub enum SharedRootError {
    #[error("--self-signed-secret {secret}: cannot {verb} the Secret: {reason}")]
    Api {
        secret: SecretRef,
        verb: &'static str,
        reason: String,
    },
    #[error(
        "--self-signed-secret {secret}: Secret key {key} is missing or empty; restore it or delete the Secret (plugca never overwrites it; deleting it makes a new root)"
    )]
    MissingKey {
        secret: SecretRef,
        key: &'static str,
    },
    #[error(
        "--self-signed-secret {secret}: {reason}; fix the Secret or delete it (plugca never overwrites it; deleting it makes a new root)"
    )]
    Invalid { secret: SecretRef, reason: String },
    #[error("--self-signed-secret {secret}: {error}")]
    Generate {
        secret: SecretRef,
        // Boxed: the rest of the enum is a few strings.
        error: Box<SelfSignedError>,
    },
}

/// Where the root came from at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Generated here and the Secret created by this replica.
    Created,
    /// The Secret existed.
    Existing,
    /// Generated here, but another replica created the Secret first: theirs is used.
    LostRace,
}

/// The Secret and the client to reach it.
#[derive(Clone)]
pub struct SharedRoot {
    api: Api<Secret>,
    secret: SecretRef,
    /// Longest wait for one API call (`--kube-api-timeout`): the clients
    /// have no read timeout (watches are long polls), and a start must not
    /// hang on an apiserver that accepts but never answers.
    timeout: Duration,
}

impl SharedRoot {
    pub fn new(client: Client, secret: SecretRef, timeout: Duration) -> SharedRoot {
        SharedRoot {
            api: Api::namespaced(client, &secret.namespace),
            secret,
            timeout,
        }
    }

    pub fn secret(&self) -> &SecretRef {
        &self.secret
    }

    /// The root every replica uses: the Secret's, or a new one this replica
    /// puts there (create-only).
    #[instrument(skip_all, fields(secret = %self.secret))]
    pub async fn load_or_create(
        &self,
        spec: &SelfSignedSpec,
        now: OffsetDateTime,
    ) -> Result<(CaBundle, Origin), SharedRootError> {
        if let Some(bundle) = self.read(now).await? {
            return Ok((bundle, Origin::Existing));
        }
        // `dir: None`: generate in memory; the Secret is where it is kept.
        let in_memory = SelfSignedSpec {
            dir: None,
            ..spec.clone()
        };
        let (generated, _) = selfsigned::load_or_create(&in_memory, now).map_err(|error| {
            SharedRootError::Generate {
                secret: self.secret.clone(),
                error: Box::new(error),
            }
        })?;
        if self.create(&generated).await? {
            return Ok((generated, Origin::Created));
        }
        match self.read(now).await? {
            Some(theirs) => Ok((theirs, Origin::LostRace)),
            // Created by another replica and deleted again in between: rare
            // enough to leave to the kubelet's restart.
            None => Err(SharedRootError::Api {
                secret: self.secret.clone(),
                verb: "get",
                reason: "created by another replica, then gone".into(),
            }),
        }
    }

    /// The Secret's root, checked; `None` when there is no Secret.
    pub async fn read(&self, now: OffsetDateTime) -> Result<Option<CaBundle>, SharedRootError> {
        let secret = tokio::time::timeout(self.timeout, self.api.get_opt(&self.secret.name))
            .await
            .map_err(|_| self.no_answer("get"))?
            .map_err(|e| self.api_error("get", e))?;
        secret
            .map(|s| bundle_from_data(&self.secret, &s.data.unwrap_or_default(), now))
            .transpose()
    }

    /// Creates the Secret holding `bundle`'s root and key. `false`: it
    /// already existed (409), nothing was written.
    pub async fn create(&self, bundle: &CaBundle) -> Result<bool, SharedRootError> {
        let (secret, params) = (secret_for(&self.secret, bundle), PostParams::default());
        let create = self.api.create(&params, &secret);
        match tokio::time::timeout(self.timeout, create)
            .await
            .map_err(|_| self.no_answer("create"))?
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(self.api_error("create", e)),
        }
    }

    fn no_answer(&self, verb: &'static str) -> SharedRootError {
        SharedRootError::Api {
            secret: self.secret.clone(),
            verb,
            reason: format!("no answer from the API server within {:?}", self.timeout),
        }
    }

    fn api_error(&self, verb: &'static str, e: kube::Error) -> SharedRootError {
        SharedRootError::Api {
            secret: self.secret.clone(),
            verb,
            reason: e.to_string(),
        }
    }
}

/// Checks the Secret's data as a self-signed root bundle: every error names
/// the Secret and the key.
pub fn bundle_from_data(
    secret: &SecretRef,
    data: &BTreeMap<String, ByteString>,
    now: OffsetDateTime,
) -> Result<CaBundle, SharedRootError> {
    let text = |key: &'static str| -> Result<String, SharedRootError> {
        let bytes = data
            .get(key)
            .map(|b| b.0.as_slice())
            .filter(|b| !b.iter().all(u8::is_ascii_whitespace))
            .ok_or_else(|| SharedRootError::MissingKey {
                secret: secret.clone(),
                key,
            })?;
        String::from_utf8(bytes.to_vec()).map_err(|_| SharedRootError::Invalid {
            secret: secret.clone(),
            reason: format!("Secret key {key}: not UTF-8 PEM text"),
        })
    };
    let cert_pem = text(CA_CERT_KEY)?;
    let key_pem = zeroize::Zeroizing::new(text(CA_KEY_KEY)?);
    // The bundle checks name these "files": the Secret's keys.
    let (cert_name, key_name) = (
        format!("Secret key {CA_CERT_KEY}"),
        format!("Secret key {CA_KEY_KEY}"),
    );
    let files = BundleFiles::new(
        Layout::SelfSigned,
        [cert_name.as_str(), &key_name, "(no chain)", &cert_name],
        cert_pem.clone(),
        key_pem,
        String::new(),
        cert_pem,
    );
    let bundle = CaBundle::from_files(files, now).map_err(|e| SharedRootError::Invalid {
        secret: secret.clone(),
        reason: e.to_string(),
    })?;
    let root = bundle.signing_cert();
    if root.subject_raw != root.issuer_raw {
        return Err(SharedRootError::Invalid {
            secret: secret.clone(),
            reason: format!(
                "Secret key {CA_CERT_KEY}: {} is issued by {}, not self-signed; plug a CA with an intermediate into --cacerts-dir instead",
                root.subject, root.issuer
            ),
        });
    }
    Ok(bundle)
}

/// The Secret as istiod writes `istio-ca-secret`.
pub fn secret_for(secret: &SecretRef, bundle: &CaBundle) -> Secret {
    let cert = format!("{}\n", bundle.signing_cert().text.trim_end());
    let key = bundle.signer().secret_key().secret_pkcs8_pem();
    let data = BTreeMap::from([
        (
            CA_CERT_KEY.to_string(),
            ByteString(cert.clone().into_bytes()),
        ),
        (CA_KEY_KEY.to_string(), ByteString(key.as_bytes().to_vec())),
        (ROOT_CERT_KEY.to_string(), ByteString(cert.into_bytes())),
        (CERT_CHAIN_KEY.to_string(), ByteString(Vec::new())),
        (PRIVATE_KEY_KEY.to_string(), ByteString(Vec::new())),
    ]);
    Secret {
        metadata: ObjectMeta {
            name: Some(secret.name.clone()),
            namespace: Some(secret.namespace.clone()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_string(),
                MANAGED_BY_VALUE.to_string(),
            )])),
            ..Default::default()
        },
        type_: Some(SECRET_TYPE.to_string()),
        data: Some(data),
        ..Default::default()
    }
}

/// Keeps this replica on the Secret's root until `shutdown`: every
/// `interval`, adopt a changed valid root; re-create a deleted Secret with
/// the root serving now. Does nothing while a plugged bundle serves.
pub async fn keep_in_sync(
    shared: SharedRoot,
    reloader: Arc<Reloader>,
    interval: Duration,
    metrics: Arc<ControllerMetrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let error = |e: &SharedRootError| {
        metrics.failed(Controller::self_signed_secret, ErrorKind::watch);
        error!(error = %e, "shared self-signed root: the serving root stays");
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stopped(&mut shutdown) => return,
        }
        let Some(current) = reloader.ca.current() else {
            continue;
        };
        if current.layout() != Layout::SelfSigned {
            continue;
        }
        match shared.read(OffsetDateTime::now_utc()).await {
            Ok(Some(theirs)) if theirs.signing_cert().der == current.signing_cert().der => {}
            Ok(Some(theirs)) => {
                let subject = theirs.signing_cert().subject.clone();
                match reloader.adopt_self_signed(theirs, OffsetDateTime::now_utc()) {
                    Ok(true) => {
                        info!(secret = %shared.secret, root = %subject, "shared self-signed root changed in its Secret: adopted")
                    }
                    Ok(false) => {}
                    Err(e) => error(&SharedRootError::Invalid {
                        secret: shared.secret.clone(),
                        reason: e.to_string(),
                    }),
                }
            }
            Ok(None) => {
                warn!(secret = %shared.secret, "the shared self-signed root's Secret is gone: re-creating it with the root serving now");
                match shared.create(&current).await {
                    Ok(true) => metrics.wrote(Controller::self_signed_secret, WriteKind::create),
                    Ok(false) => {}
                    Err(e) => error(&e),
                }
            }
            Err(e) => error(&e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::generate::KeyChoice;

    fn secret() -> SecretRef {
        SecretRef::parse("istio-system/plugca-root").unwrap()
    }

    fn spec() -> SelfSignedSpec {
        SelfSignedSpec {
            dir: None,
            key: KeyChoice::P256,
            ttl: Duration::from_secs(86_400),
            organization: "cluster.local".into(),
        }
    }

    fn data_of(s: &Secret) -> BTreeMap<String, ByteString> {
        s.data.clone().unwrap()
    }

    #[test]
    fn secret_refs_are_namespace_slash_name() {
        assert_eq!(secret().to_string(), "istio-system/plugca-root");
        for (bad, why) in [
            ("plugca-root", "not namespace/name"),
            ("Istio/x", "namespace \"Istio\""),
            ("ns/", "Secret name \"\""),
            ("ns/a_b", "Secret name \"a_b\""),
            ("ns/a/b", "Secret name \"a/b\""),
        ] {
            let e = SecretRef::parse(bad).unwrap_err();
            assert!(e.starts_with(why), "{bad}: {e}");
        }
    }

    #[test]
    fn a_secret_written_for_a_root_reads_back_as_the_same_root() {
        let now = OffsetDateTime::now_utc();
        let (bundle, _) = selfsigned::load_or_create(&spec(), now).unwrap();
        let s = secret_for(&secret(), &bundle);
        assert_eq!(s.type_.as_deref(), Some("istio.io/ca-root"));
        let data = data_of(&s);
        assert_eq!(data[ROOT_CERT_KEY], data[CA_CERT_KEY]);
        assert!(data[CERT_CHAIN_KEY].0.is_empty() && data[PRIVATE_KEY_KEY].0.is_empty());
        let back = bundle_from_data(&secret(), &data, now).unwrap();
        assert_eq!(back.signing_cert().der, bundle.signing_cert().der);
        assert!(back.same_material(&bundle));
    }

    #[test]
    fn bad_secret_contents_name_the_secret_and_the_key() {
        let now = OffsetDateTime::now_utc();
        let (bundle, _) = selfsigned::load_or_create(&spec(), now).unwrap();
        let (other, _) = selfsigned::load_or_create(&spec(), now).unwrap();
        let good = data_of(&secret_for(&secret(), &bundle));
        let other = data_of(&secret_for(&secret(), &other));
        let with = |key: &str, value: &[u8]| {
            let mut d = good.clone();
            d.insert(key.to_string(), ByteString(value.to_vec()));
            d
        };
        let mut no_key = good.clone();
        no_key.remove(CA_KEY_KEY);
        let table: Vec<(BTreeMap<String, ByteString>, &str)> = vec![
            (
                no_key,
                "--self-signed-secret istio-system/plugca-root: Secret key ca-key.pem is missing or empty",
            ),
            (
                with(CA_CERT_KEY, b"  \n"),
                "--self-signed-secret istio-system/plugca-root: Secret key ca-cert.pem is missing or empty",
            ),
            (
                with(CA_CERT_KEY, b"garbage"),
                "--self-signed-secret istio-system/plugca-root: Secret key ca-cert.pem",
            ),
            (
                with(CA_KEY_KEY, b"garbage"),
                "--self-signed-secret istio-system/plugca-root: Secret key ca-key.pem",
            ),
            (
                with(CA_KEY_KEY, &other[CA_KEY_KEY].0),
                "--self-signed-secret istio-system/plugca-root: ",
            ),
            (
                with(CA_CERT_KEY, &[0xff, 0xfe]),
                "--self-signed-secret istio-system/plugca-root: Secret key ca-cert.pem: not UTF-8",
            ),
        ];
        for (data, want) in table {
            let e = bundle_from_data(&secret(), &data, now)
                .err()
                .unwrap_or_else(|| panic!("accepted, wanted {want}"))
                .to_string();
            assert!(e.starts_with(want), "want {want}\n got {e}");
        }
        // An intermediate is not a self-signed root: it belongs in --cacerts-dir.
        let spec = |cn: &str| crate::ca::generate::CaSpec {
            organization: Some("cluster.local".into()),
            common_name: Some(cn.into()),
            locality: None,
            not_before: now - time::Duration::minutes(5),
            not_after: now + time::Duration::days(30),
            path_len: None,
            dns_sans: Vec::new(),
        };
        let key = || crate::ca::generate::generate_key(KeyChoice::P256).unwrap();
        let root = crate::ca::generate::self_signed_root(&spec("root"), key()).unwrap();
        let ica = crate::ca::generate::intermediate(&spec("ica"), key(), &root.cert_der, &root.key)
            .unwrap();
        let mut data = with(CA_CERT_KEY, ica.cert_pem.as_bytes());
        data.insert(
            CA_KEY_KEY.into(),
            ByteString(ica.key.secret_pkcs8_pem().as_bytes().to_vec()),
        );
        let e = bundle_from_data(&secret(), &data, now)
            .expect_err("an intermediate was accepted as the shared root")
            .to_string();
        assert!(
            e.starts_with("--self-signed-secret istio-system/plugca-root: Secret key ca-cert.pem"),
            "{e}"
        );

        // The mismatched key says so.
        let e = bundle_from_data(&secret(), &with(CA_KEY_KEY, &other[CA_KEY_KEY].0), now)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("ca-key.pem") && e.contains("match"), "{e}");
    }
}
