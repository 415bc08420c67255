//! istiod's serving certificate, as istio-csr provides it: Secret `istiod-tls`
//! (type `kubernetes.io/tls`: `tls.crt` = leaf + intermediates, `tls.key`,
//! `ca.crt` = the root bundle) in istiod's namespace. istiod's chart mounts it
//! at `/var/run/secrets/istiod/tls` and watches the files, so a rewrite is
//! picked up without a restart.
//!
//! The leaf comes from [`crate::tls::issue_serving`], the path that issues
//! plugca's own serving certificate: same signer, same leaf profile (serverAuth
//! and clientAuth, critical SAN), a fresh P-256 key each time. It is renewed
//! at two thirds of its life, right after a CA reload, and whenever the Secret
//! is missing, edited, or no longer matches the CA or the configured names.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use time::OffsetDateTime;
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::asn1::GeneralName;
use crate::ca::CaBundle;
use crate::controllers::leader::Leadership;
use crate::controllers::metrics::{Controller, ControllerMetrics, ErrorKind, WriteKind};
use crate::controllers::root_configmap::watch_into_store;
use crate::controllers::{
    CurrentCa, FIELD_MANAGER, MANAGED_BY_LABEL, MANAGED_BY_VALUE, changed_or_pending, trust_bundle,
};
use crate::identity::TrustDomain;
use crate::tls::{self, TlsError};

/// The name istiod's chart mounts (`istio-discovery/templates/deployment.yaml`).
pub const SECRET_NAME: &str = "istiod-tls";
pub const SECRET_TYPE: &str = "kubernetes.io/tls";
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const CA_CRT: &str = "ca.crt";
/// istiod's service account in Istio's charts.
pub const ISTIOD_SERVICE_ACCOUNT: &str = "istiod";
/// Lifetime of istiod's certificate (clamped to the CA's). istiod reloads the
/// files, so a short life costs nothing; a day keeps an outage of plugca's
/// writer (16 h of margin at the 2/3 renewal) harmless.
pub const CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// SHA-256 of what we wrote; any other content is an edit to undo.
pub const CONTENT_HASH_ANNOTATION: &str = "plugca.io/content-sha256";
/// The SANs requested, so a change of `--istiod-*` flags reissues.
pub const SANS_ANNOTATION: &str = "plugca.io/sans";
/// Full check even without events.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(300);
/// After a failed issue or write, try again this soon.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// After our write, the watch may still show the old object this long.
const STORE_CATCH_UP: Duration = Duration::from_secs(10);

/// Names and place of istiod's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IstiodTlsConfig {
    pub namespace: String,
    /// `istiod-<rev>.<ns>.svc` is added for each.
    pub revisions: Vec<String>,
    pub extra_dns_names: Vec<String>,
    pub trust_domain: TrustDomain,
}

impl IstiodTlsConfig {
    /// `istiod.<ns>.svc`, `istiod-<rev>.<ns>.svc` per revision, then the extras; no duplicates.
    pub fn dns_names(&self) -> Vec<String> {
        let ns = &self.namespace;
        let mut names = vec![format!("istiod.{ns}.svc")];
        names.extend(
            self.revisions
                .iter()
                .filter(|r| !r.is_empty() && r.as_str() != "default")
                .map(|r| format!("istiod-{r}.{ns}.svc")),
        );
        names.extend(
            self.extra_dns_names
                .iter()
                .filter(|n| !n.is_empty())
                .cloned(),
        );
        let mut seen = std::collections::BTreeSet::new();
        names.retain(|n| seen.insert(n.clone()));
        names
    }

    /// `spiffe://<td>/ns/<ns>/sa/istiod`.
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{ISTIOD_SERVICE_ACCOUNT}",
            self.trust_domain, self.namespace
        )
    }

    pub fn sans(&self) -> Vec<GeneralName> {
        let mut sans: Vec<GeneralName> =
            self.dns_names().into_iter().map(GeneralName::Dns).collect();
        sans.push(GeneralName::Uri(self.spiffe_id()));
        sans
    }

    fn sans_annotation(&self) -> String {
        self.sans()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// istiod's certificate files. `Debug` elides the key.
pub struct IstiodCert {
    /// Leaf then intermediates.
    pub tls_crt: String,
    tls_key: zeroize::Zeroizing<String>,
    /// The root bundle workloads get (plugged roots plus `--extra-trust-roots`).
    pub ca_crt: String,
    pub serial_hex: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl std::fmt::Debug for IstiodCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IstiodCert")
            .field("serial", &self.serial_hex)
            .field("not_after", &self.not_after)
            .field("tls_key", &"[elided]")
            .finish_non_exhaustive()
    }
}

impl IstiodCert {
    pub fn secret_key_pem(&self) -> &str {
        &self.tls_key
    }

    pub fn renew_at(&self) -> OffsetDateTime {
        renew_at(self.not_before, self.not_after)
    }
}

/// Issues istiod's certificate from `bundle`.
pub fn issue(
    bundle: &CaBundle,
    config: &IstiodTlsConfig,
    now: OffsetDateTime,
) -> Result<IstiodCert, TlsError> {
    let serving = tls::issue_serving(bundle, &config.sans(), CERT_TTL, now)?;
    let mut tls_crt = serving.leaf.pem.clone();
    for cert in bundle.served_chain() {
        tls_crt.push_str(cert);
    }
    Ok(IstiodCert {
        tls_crt,
        tls_key: serving.secret_key_pem(),
        ca_crt: trust_bundle(bundle),
        serial_hex: serving.leaf.serial_hex.clone(),
        not_before: serving.not_before,
        not_after: serving.not_after,
    })
}

/// Two thirds into the validity window.
pub fn renew_at(not_before: OffsetDateTime, not_after: OffsetDateTime) -> OffsetDateTime {
    not_before + (not_after - not_before) * 2 / 3
}

/// The Secret holding `cert`.
pub fn secret(config: &IstiodTlsConfig, cert: &IstiodCert) -> Secret {
    let data = BTreeMap::from([
        (
            TLS_CRT.to_string(),
            ByteString(cert.tls_crt.as_bytes().to_vec()),
        ),
        (
            TLS_KEY.to_string(),
            ByteString(cert.tls_key.as_bytes().to_vec()),
        ),
        (
            CA_CRT.to_string(),
            ByteString(cert.ca_crt.as_bytes().to_vec()),
        ),
    ]);
    Secret {
        metadata: ObjectMeta {
            name: Some(SECRET_NAME.into()),
            namespace: Some(config.namespace.clone()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_string(),
                MANAGED_BY_VALUE.to_string(),
            )])),
            annotations: Some(BTreeMap::from([
                (CONTENT_HASH_ANNOTATION.to_string(), content_hash(&data)),
                (SANS_ANNOTATION.to_string(), config.sans_annotation()),
            ])),
            ..ObjectMeta::default()
        },
        type_: Some(SECRET_TYPE.into()),
        data: Some(data),
        ..Secret::default()
    }
}

/// Why the certificate is (re)issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Missing,
    /// A Secret of another type (immutable): deleted and re-created.
    WrongType,
    /// The data is not what we wrote (edited, or written by someone else).
    Edited,
    Unreadable,
    NamesChanged,
    /// Not issued by the signing certificate serving now, or another chain.
    IssuerChanged,
    TrustChanged,
    Due,
    Expired,
    CaReloaded,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reason::Missing => "the Secret is missing",
            Reason::WrongType => "the Secret has another type",
            Reason::Edited => "the Secret was edited",
            Reason::Unreadable => "tls.crt does not parse",
            Reason::NamesChanged => "the configured names changed",
            Reason::IssuerChanged => "the CA signing certificate changed",
            Reason::TrustChanged => "the root bundle changed",
            Reason::Due => "two thirds of its life are over",
            Reason::Expired => "it has expired",
            Reason::CaReloaded => "the CA was reloaded",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Current { renew_at: OffsetDateTime },
    Reissue(Reason),
}

/// Decides whether `existing` can stay.
pub fn check(
    existing: Option<&Secret>,
    config: &IstiodTlsConfig,
    bundle: &CaBundle,
    now: OffsetDateTime,
) -> Verdict {
    let Some(secret) = existing else {
        return Verdict::Reissue(Reason::Missing);
    };
    if secret.type_.as_deref() != Some(SECRET_TYPE) {
        return Verdict::Reissue(Reason::WrongType);
    }
    let Some(data) = &secret.data else {
        return Verdict::Reissue(Reason::Edited);
    };
    let annotations = secret.metadata.annotations.as_ref();
    let annotation = |k: &str| annotations.and_then(|a| a.get(k)).map(String::as_str);
    let ours = BTreeMap::from_iter(
        [TLS_CRT, TLS_KEY, CA_CRT]
            .iter()
            .filter_map(|k| data.get(*k).map(|v| (k.to_string(), v.clone()))),
    );
    if ours.len() != 3 || annotation(CONTENT_HASH_ANNOTATION) != Some(content_hash(&ours).as_str())
    {
        return Verdict::Reissue(Reason::Edited);
    }
    if annotation(SANS_ANNOTATION) != Some(config.sans_annotation().as_str()) {
        return Verdict::Reissue(Reason::NamesChanged);
    }
    if ours[CA_CRT].0 != trust_bundle(bundle).as_bytes() {
        return Verdict::Reissue(Reason::TrustChanged);
    }
    let Ok(tls_crt) = std::str::from_utf8(&ours[TLS_CRT].0) else {
        return Verdict::Reissue(Reason::Unreadable);
    };
    let Some(leaf) = crate::pem::parse_all(tls_crt)
        .ok()
        .and_then(|blocks| blocks.into_iter().next())
        .and_then(|b| {
            crate::ca::cert::Cert::parse(
                b.der,
                b.text,
                crate::ca::cert::Origin {
                    file: TLS_CRT.into(),
                    index: 0,
                },
            )
            .ok()
        })
    else {
        return Verdict::Reissue(Reason::Unreadable);
    };
    if !leaf.is_signed_by(bundle.signing_cert())
        || !tls_crt.ends_with(&bundle.served_chain().concat())
    {
        return Verdict::Reissue(Reason::IssuerChanged);
    }
    if now >= leaf.not_after {
        return Verdict::Reissue(Reason::Expired);
    }
    let renew_at = renew_at(leaf.not_before, leaf.not_after);
    if now >= renew_at {
        return Verdict::Reissue(Reason::Due);
    }
    Verdict::Current { renew_at }
}

/// SHA-256 over the three keys, each length-prefixed.
fn content_hash(data: &BTreeMap<String, ByteString>) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for key in [TLS_CRT, TLS_KEY, CA_CRT] {
        let value = data.get(key).map_or(&[][..], |v| v.0.as_slice());
        ctx.update(&(value.len() as u64).to_be_bytes());
        ctx.update(value);
    }
    crate::ca::signer::hex(ctx.finish().as_ref())
}

/// Keeps the Secret current until `shutdown` flips.
pub async fn run(
    client: kube::Client,
    config: IstiodTlsConfig,
    ca: Arc<dyn CurrentCa>,
    mut reloads: watch::Receiver<u64>,
    mut leadership: Leadership,
    metrics: Arc<ControllerMetrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Secret> = Api::namespaced(client, &config.namespace);
    let events = Arc::new(Notify::new());
    let watched = watch_into_store(
        api.clone(),
        watcher::Config::default().fields(&format!("metadata.name={SECRET_NAME}")),
        events.clone(),
        metrics.clone(),
        "istiod-tls",
    );
    info!(
        namespace = %config.namespace,
        sans = %config.sans_annotation(),
        "istiod serving certificate: Secret {SECRET_NAME}"
    );
    tokio::select! {
        r = watched.store.wait_until_ready() => if r.is_err() { return; },
        _ = crate::controllers::stopped(&mut shutdown) => return,
    }
    let key = ObjectRef::new(SECRET_NAME).within(&config.namespace);
    let mut seen_generation = *reloads.borrow_and_update();
    let mut reloaded = false;
    let mut pending: Option<(Option<String>, Instant)> = None;
    let mut next = Duration::ZERO;
    loop {
        tokio::select! {
            _ = events.notified() => {}
            _ = changed_or_pending(&mut reloads) => {
                let generation = *reloads.borrow_and_update();
                reloaded |= generation != seen_generation;
                seen_generation = generation;
            }
            _ = leadership.changed() => {}
            _ = tokio::time::sleep(next) => {}
            _ = crate::controllers::stopped(&mut shutdown) => break,
        }
        next = RESYNC_INTERVAL;
        if !leadership.is_leader() {
            continue;
        }
        let Some(bundle) = ca.current() else {
            continue;
        };
        let existing = watched.store.get(&key);
        let rv = existing
            .as_ref()
            .and_then(|s| s.metadata.resource_version.clone());
        if let Some((before, at)) = &pending {
            if *before == rv && at.elapsed() < STORE_CATCH_UP {
                next = Duration::from_millis(500);
                continue;
            }
            pending = None;
        }
        let now = OffsetDateTime::now_utc();
        let verdict = match check(existing.as_deref(), &config, &bundle, now) {
            Verdict::Current { .. } if reloaded => Verdict::Reissue(Reason::CaReloaded),
            v => v,
        };
        let reason = match verdict {
            Verdict::Current { renew_at } => {
                next = until(renew_at, now).min(RESYNC_INTERVAL);
                continue;
            }
            Verdict::Reissue(reason) => reason,
        };
        let cert = match issue(&bundle, &config, now) {
            Ok(c) => c,
            Err(e) => {
                metrics.failed(Controller::istiod_tls, ErrorKind::issue);
                warn!(error = %e, "cannot issue istiod's certificate; retrying");
                next = RETRY_INTERVAL;
                continue;
            }
        };
        let kind = match reason {
            Reason::Missing => WriteKind::create,
            Reason::WrongType => WriteKind::replace,
            _ => WriteKind::update,
        };
        if !leadership.is_leader() {
            continue;
        }
        match write(&api, &config, &cert, kind).await {
            Ok(()) => {
                metrics.wrote(Controller::istiod_tls, kind);
                info!(
                    namespace = %config.namespace,
                    reason = %reason,
                    serial = %cert.serial_hex,
                    not_after = %crate::ca::cert::rfc3339(cert.not_after),
                    renew_at = %crate::ca::cert::rfc3339(cert.renew_at()),
                    "{SECRET_NAME} written"
                );
                reloaded = false;
                pending = Some((rv, Instant::now()));
                next = until(cert.renew_at(), now).min(RESYNC_INTERVAL);
            }
            Err(e) => {
                metrics.failed(Controller::istiod_tls, ErrorKind::write);
                warn!(namespace = %config.namespace, error = %e, "cannot write {SECRET_NAME}; retrying");
                next = RETRY_INTERVAL;
            }
        }
    }
    watched.task.abort();
}

async fn write(
    api: &Api<Secret>,
    config: &IstiodTlsConfig,
    cert: &IstiodCert,
    kind: WriteKind,
) -> Result<(), kube::Error> {
    if kind == WriteKind::replace {
        // `type` is immutable: the only way to a TLS Secret is a new object.
        match api.delete(SECRET_NAME, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    api.patch(
        SECRET_NAME,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&secret(config, cert)),
    )
    .await
    .map(|_| ())
}

fn until(at: OffsetDateTime, now: OffsetDateTime) -> Duration {
    Duration::try_from(at - now).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::selfsigned::{self, SelfSignedSpec};

    /// The committed sample bundle: root -> intermediate (signing).
    fn bundle() -> CaBundle {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
        CaBundle::load_dir(&dir, OffsetDateTime::now_utc())
            .unwrap()
            .expect("certs/ holds a complete bundle")
    }

    fn other_ca() -> CaBundle {
        let spec = SelfSignedSpec {
            dir: None,
            key: crate::ca::generate::KeyChoice::P256,
            ttl: Duration::from_secs(3600 * 24 * 30),
            organization: "cluster.local".into(),
        };
        selfsigned::load_or_create(&spec, OffsetDateTime::now_utc())
            .unwrap()
            .0
    }

    fn config() -> IstiodTlsConfig {
        IstiodTlsConfig {
            namespace: "istio-system".into(),
            revisions: vec!["canary".into(), "default".into()],
            extra_dns_names: vec![
                "istiod.example.com".into(),
                "istiod.istio-system.svc".into(),
            ],
            trust_domain: TrustDomain::parse("cluster.local").unwrap(),
        }
    }

    #[test]
    fn names_follow_istio_csr_plus_revisions_and_extras() {
        let c = config();
        assert_eq!(
            c.dns_names(),
            [
                "istiod.istio-system.svc",
                "istiod-canary.istio-system.svc",
                "istiod.example.com"
            ]
        );
        assert_eq!(
            c.spiffe_id(),
            "spiffe://cluster.local/ns/istio-system/sa/istiod"
        );
        assert_eq!(
            c.sans_annotation(),
            "DNS:istiod.istio-system.svc,DNS:istiod-canary.istio-system.svc,DNS:istiod.example.com,URI:spiffe://cluster.local/ns/istio-system/sa/istiod"
        );
    }

    #[test]
    fn renewal_is_at_two_thirds_of_the_life() {
        let nb = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let na = nb + time::Duration::hours(24);
        assert_eq!(renew_at(nb, na), nb + time::Duration::hours(16));
    }

    #[test]
    fn a_fresh_secret_is_current_until_two_thirds() {
        let ca = bundle();
        let now = OffsetDateTime::now_utc();
        let cert = issue(&ca, &config(), now).unwrap();
        let s = secret(&config(), &cert);
        assert_eq!(s.type_.as_deref(), Some("kubernetes.io/tls"));
        let data = s.data.as_ref().unwrap();
        assert!(
            std::str::from_utf8(&data["tls.key"].0)
                .unwrap()
                .contains("BEGIN PRIVATE KEY")
        );
        assert_eq!(data["ca.crt"].0, trust_bundle(&ca).as_bytes());
        let crt = std::str::from_utf8(&data["tls.crt"].0).unwrap();
        assert_eq!(
            crate::pem::parse_all(crt).unwrap().len(),
            1 + ca.served_chain().len()
        );
        match check(Some(&s), &config(), &ca, now) {
            Verdict::Current { renew_at } => assert_eq!(renew_at, cert.renew_at()),
            v => panic!("{v:?}"),
        }
        let later = cert.renew_at() + time::Duration::seconds(1);
        assert_eq!(
            check(Some(&s), &config(), &ca, later),
            Verdict::Reissue(Reason::Due)
        );
        let after = cert.not_after + time::Duration::seconds(1);
        assert_eq!(
            check(Some(&s), &config(), &ca, after),
            Verdict::Reissue(Reason::Expired)
        );
    }

    #[test]
    fn missing_edited_retyped_renamed_or_foreign_secrets_are_reissued() {
        let ca = bundle();
        let now = OffsetDateTime::now_utc();
        let good = secret(&config(), &issue(&ca, &config(), now).unwrap());
        assert_eq!(
            check(None, &config(), &ca, now),
            Verdict::Reissue(Reason::Missing)
        );

        let mut retyped = good.clone();
        retyped.type_ = Some("Opaque".into());
        assert_eq!(
            check(Some(&retyped), &config(), &ca, now),
            Verdict::Reissue(Reason::WrongType)
        );

        let mut edited = good.clone();
        edited
            .data
            .as_mut()
            .unwrap()
            .insert(CA_CRT.into(), ByteString(b"x".to_vec()));
        assert_eq!(
            check(Some(&edited), &config(), &ca, now),
            Verdict::Reissue(Reason::Edited)
        );

        let mut unannotated = good.clone();
        unannotated.metadata.annotations = None;
        assert_eq!(
            check(Some(&unannotated), &config(), &ca, now),
            Verdict::Reissue(Reason::Edited)
        );

        let mut renamed = config();
        renamed.revisions.push("stable".into());
        assert_eq!(
            check(Some(&good), &renamed, &ca, now),
            Verdict::Reissue(Reason::NamesChanged)
        );

        // Another CA: the root bundle differs first.
        let other = other_ca();
        assert_eq!(
            check(Some(&good), &config(), &other, now),
            Verdict::Reissue(Reason::TrustChanged)
        );
    }
}
