//! Keeping the CA current without a restart: watch the cacerts directory
//! (including Kubernetes' `..data` symlink swap), debounce, re-run every load
//! check, apply the root rotation rules, and swap bundle and serving
//! certificate whole. A refused bundle leaves the old one serving.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::ca::Current;
use crate::ca::bundle::{BundleError, BundleFiles, CaBundle, Layout};
use crate::ca::rotation::RootChange;
use crate::ca::selfsigned::{self, SelfSignedError, SelfSignedSpec};
use crate::metrics::{CaCertKind, CaCertLabels, Metrics, ReloadLabels, ReloadResult};
use crate::tls::{self, TlsError};

/// Events closer together than this are handled as one reload.
pub const DEBOUNCE: Duration = Duration::from_millis(200);
/// Longest wait for reading the cacerts directory (a hung mount): the read
/// runs on its own thread, and past this the reload fails instead of holding
/// the reload lock forever.
pub const READ_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Bundle(#[from] BundleError),
    #[error(
        "{dir}/root-cert.pem: {change}; refused because it would break trust for existing workloads (add the new root next to the old one first, or pass --allow-root-replacement)"
    )]
    UnsafeRootChange { dir: String, change: RootChange },
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    SelfSigned(#[from] SelfSignedError),
    #[error(
        "{dir}: reading the CA bundle files did not finish within {after:?} (hung mount?); the previous CA keeps serving"
    )]
    ReadStuck { dir: String, after: Duration },
    #[error(
        "{dir}: an earlier read of the CA bundle files is still blocked; not starting another until it returns"
    )]
    StillStuck { dir: String },
    #[error(
        "{dir}: reading the CA bundle files at start did not finish within {after:?} (hung mount?); not starting"
    )]
    StartReadStuck { dir: String, after: Duration },
    #[error(
        "--cacerts-dir {dir}: no such directory; check the path (env ROOT_CA_DIR), or pass --self-signed to run on a generated root"
    )]
    CacertsDirMissing { dir: String },
    #[error("--cacerts-dir {dir}: cannot read the directory: {reason}")]
    CacertsDirUnreadable { dir: String, reason: String },
    #[error(
        "--cacerts-dir {dir}: no CA bundle here (none of ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem, tls.crt); plug one in, or pass --self-signed to run on a generated root"
    )]
    NoBundle { dir: String },
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    Unchanged,
    Swapped {
        roots: RootChange,
        from_self_signed: bool,
    },
    /// The directory no longer holds a bundle; the loaded CA stays.
    Kept,
}

/// What a [`Reloader`] watches and the rules it applies (from the config).
#[derive(Debug, Clone)]
pub struct ReloadSettings {
    /// The cacerts directory.
    pub dir: PathBuf,
    /// DNS names of the serving certificate, re-issued on every swap.
    pub dns_names: Vec<String>,
    pub allow_root_replacement: bool,
    pub extra_trust_roots: Option<PathBuf>,
    /// The self-signed root used when the directory holds no bundle.
    pub self_signed: SelfSignedSpec,
    /// The self-signed root is kept in a Secret all replicas share
    /// (`--self-signed-secret`): never renewed here, where each replica
    /// would make a different one; see [`Reloader::adopt_self_signed`].
    pub self_signed_shared: bool,
    pub expiry_warning: Duration,
}

/// Settings and shared state of the reloader.
pub struct Reloader {
    pub dir: PathBuf,
    pub ca: Arc<Current>,
    pub tls: Arc<ArcSwap<rustls::ServerConfig>>,
    pub dns_names: Vec<String>,
    pub metrics: Arc<Metrics>,
    pub allow_root_replacement: bool,
    pub extra_trust_roots: Option<PathBuf>,
    pub self_signed: SelfSignedSpec,
    pub self_signed_shared: bool,
    pub expiry_warning: Duration,
    /// Reloads run one at a time.
    lock: Mutex<()>,
    /// Bumped after every successful swap (the in-cluster controllers rewrite on it).
    generation: watch::Sender<u64>,
    /// A bundle read that passed its deadline and has not returned yet.
    read_stuck: Arc<AtomicBool>,
}

impl Reloader {
    /// A reloader for `settings` that swaps `ca` and `tls` and counts in `metrics`.
    pub fn new(
        settings: ReloadSettings,
        ca: Arc<Current>,
        tls: Arc<ArcSwap<rustls::ServerConfig>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let ReloadSettings {
            dir,
            dns_names,
            allow_root_replacement,
            extra_trust_roots,
            self_signed,
            self_signed_shared,
            expiry_warning,
        } = settings;
        Reloader {
            dir,
            ca,
            tls,
            dns_names,
            metrics,
            allow_root_replacement,
            extra_trust_roots,
            self_signed,
            self_signed_shared,
            expiry_warning,
            lock: Mutex::new(()),
            generation: watch::Sender::new(0),
            read_stuck: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Counts the CA swaps from now on; changes after every successful one.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The bundle to start with: the plugged one, else, when `self_signed`
    /// mode was asked for (`--self-signed`), the self-signed one. An
    /// unreadable directory is an error either way; a missing or empty one
    /// is an error unless self-signed mode was asked for (a mistyped path
    /// must not start a CA no workload trusts).
    pub fn initial_bundle(
        dir: &std::path::Path,
        self_signed: Option<&SelfSignedSpec>,
        extra_trust_roots: Option<&std::path::Path>,
        now: OffsetDateTime,
    ) -> Result<CaBundle, ReloadError> {
        let (exists, files) = read_at_start(dir)?;
        let bundle = match files.map(|f| CaBundle::from_files(f, now)).transpose()? {
            Some(b) => b,
            None => {
                let shown = dir.display().to_string();
                let Some(self_signed) = self_signed else {
                    return Err(if exists {
                        ReloadError::NoBundle { dir: shown }
                    } else {
                        ReloadError::CacertsDirMissing { dir: shown }
                    });
                };
                let (b, origin) = selfsigned::load_or_create(self_signed, now)?;
                warn!(
                    dir = %dir.display(),
                    dir_exists = exists,
                    origin = ?origin,
                    persisted_in = ?self_signed.dir,
                    root = %b.signing_cert().subject,
                    "no plugged-in CA bundle: using a self-signed root (--self-signed){}",
                    if self_signed.dir.is_none() { " kept in memory only (it changes on every start; set --self-signed-dir to keep it)" } else { "" }
                );
                b
            }
        };
        with_extra_roots(bundle, extra_trust_roots)
    }

    /// Re-reads the directory and swaps the CA if it changed and passes every check.
    pub fn reload(&self, now: OffsetDateTime) -> Result<ReloadOutcome, ReloadError> {
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.ca.current();
        let files = self.read_files()?;
        let loaded = match files.map(|f| CaBundle::from_files(f, now)).transpose()? {
            Some(b) => with_extra_roots(b, self.extra_trust_roots.as_deref())?,
            None => {
                if current
                    .as_ref()
                    .is_some_and(|c| c.layout() != Layout::SelfSigned)
                {
                    warn!(dir = %self.dir.display(), "the CA bundle files are gone; keeping the loaded CA");
                    return Ok(ReloadOutcome::Kept);
                }
                return Ok(ReloadOutcome::Unchanged);
            }
        };
        let mut roots = RootChange::Added;
        let mut from_self_signed = true;
        if let Some(cur) = &current {
            if cur.same_material(&loaded) {
                return Ok(ReloadOutcome::Unchanged);
            }
            from_self_signed = cur.layout() == Layout::SelfSigned;
            if !from_self_signed {
                roots = RootChange::classify(&cur.root_ders(), &loaded.root_ders());
                if !roots.is_safe() && !self.allow_root_replacement {
                    return Err(ReloadError::UnsafeRootChange {
                        dir: self.dir.display().to_string(),
                        change: roots,
                    });
                }
            }
        }
        self.swap(loaded, now)?;
        Ok(ReloadOutcome::Swapped {
            roots,
            from_self_signed,
        })
    }

    /// Reads the bundle files off-thread within [`READ_DEADLINE`]; at most
    /// one stuck read thread exists at a time.
    fn read_files(&self) -> Result<Option<BundleFiles>, ReloadError> {
        let dir = self.dir.clone();
        let shown = || self.dir.display().to_string();
        let result = with_deadline(&self.read_stuck, READ_DEADLINE, move || {
            crate::ca::bundle::read_files(&dir)
        });
        self.metrics
            .hardening
            .reload_stuck
            .set(i64::from(self.read_stuck.load(Ordering::Acquire)));
        match result {
            Deadline::Done(r) => Ok(r?),
            Deadline::TimedOut => Err(ReloadError::ReadStuck {
                dir: shown(),
                after: READ_DEADLINE,
            }),
            Deadline::Busy => Err(ReloadError::StillStuck { dir: shown() }),
        }
    }

    /// Renews the self-signed root when it enters its last 20 % of life.
    pub fn renew_self_signed_if_due(&self, now: OffsetDateTime) -> Result<bool, ReloadError> {
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(cur) = self.ca.current() else {
            return Ok(false);
        };
        if cur.layout() != Layout::SelfSigned || self.self_signed_shared {
            return Ok(false);
        }
        match selfsigned::renew_if_due(&self.self_signed, &cur, now)? {
            Some(renewed) => {
                let renewed = with_extra_roots(renewed, self.extra_trust_roots.as_deref())?;
                self.swap(renewed, now)?;
                info!("self-signed root renewed with the same key");
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Serves `bundle`, the shared self-signed root another replica or an
    /// operator put in the Secret, while a self-signed root serves (a plugged
    /// bundle always wins). `false`: nothing changed.
    pub fn adopt_self_signed(
        &self,
        bundle: CaBundle,
        now: OffsetDateTime,
    ) -> Result<bool, ReloadError> {
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(cur) = self.ca.current() else {
            return Ok(false);
        };
        if cur.layout() != Layout::SelfSigned {
            return Ok(false);
        }
        let bundle = with_extra_roots(bundle, self.extra_trust_roots.as_deref())?;
        if cur.same_material(&bundle) {
            return Ok(false);
        }
        self.swap(bundle, now)?;
        Ok(true)
    }

    /// Sets the expiry metrics and warns about certificates close to NotAfter.
    pub fn check_expiry(&self, now: OffsetDateTime) {
        let Some(bundle) = self.ca.current() else {
            return;
        };
        self.metrics.set_expiry(
            bundle.root_expiry().unix_timestamp(),
            bundle.signing_cert().not_after.unix_timestamp(),
        );
        let horizon =
            now + time::Duration::try_from(self.expiry_warning).unwrap_or(time::Duration::ZERO);
        let signing = bundle.signing_cert();
        let signing_soon = signing.not_after <= horizon;
        let roots_soon: Vec<_> = bundle
            .roots()
            .iter()
            .filter(|r| r.not_after <= horizon)
            .collect();
        self.metrics
            .expiring
            .get_or_create(&CaCertLabels {
                cert: CaCertKind::signing,
            })
            .set(i64::from(signing_soon));
        self.metrics
            .expiring
            .get_or_create(&CaCertLabels {
                cert: CaCertKind::root,
            })
            .set(i64::from(!roots_soon.is_empty()));
        if signing_soon {
            warn!(
                cert = %signing.origin,
                subject = %signing.subject,
                not_after = %crate::ca::cert::rfc3339(signing.not_after),
                days_left = (signing.not_after - now).whole_days(),
                "the CA signing certificate expires soon: rotate it"
            );
        }
        for root in roots_soon {
            warn!(
                cert = %root.origin,
                subject = %root.subject,
                not_after = %crate::ca::cert::rfc3339(root.not_after),
                days_left = (root.not_after - now).whole_days(),
                "a root certificate expires soon: rotate it"
            );
        }
    }

    fn swap(&self, bundle: CaBundle, now: OffsetDateTime) -> Result<(), ReloadError> {
        let tls_config = tls::server_config(&bundle, &self.dns_names)?;
        self.ca.replace(bundle);
        self.tls.store(tls_config);
        self.generation.send_modify(|g| *g += 1);
        self.check_expiry(now);
        Ok(())
    }

    fn record(&self, result: &Result<ReloadOutcome, ReloadError>, trigger: &str) {
        let unix_now = OffsetDateTime::now_utc().unix_timestamp() as f64;
        self.metrics.hardening.reload_last_attempt.set(unix_now);
        if result.is_ok() {
            self.metrics.hardening.reload_last_success.set(unix_now);
        }
        match result {
            Ok(ReloadOutcome::Swapped {
                roots,
                from_self_signed,
            }) => {
                self.metrics
                    .reloads
                    .get_or_create(&ReloadLabels {
                        result: ReloadResult::success,
                    })
                    .inc();
                let bundle = self.ca.current();
                info!(
                    trigger,
                    dir = %self.dir.display(),
                    roots = %roots,
                    from_self_signed,
                    signing = bundle.as_ref().map(|b| b.signing_cert().subject.clone()).unwrap_or_default(),
                    "CA bundle reloaded; serving certificate re-issued"
                );
            }
            Ok(ReloadOutcome::Unchanged) => debug!(trigger, "CA bundle unchanged"),
            Ok(ReloadOutcome::Kept) => {}
            Err(e) => {
                self.metrics
                    .reloads
                    .get_or_create(&ReloadLabels {
                        result: ReloadResult::failure,
                    })
                    .inc();
                error!(trigger, error = %e, "CA bundle reload refused; the previous CA keeps serving");
            }
        }
    }

    /// Runs the watcher, SIGHUP handler and periodic checks until `stop` flips.
    pub fn spawn(
        self: Arc<Self>,
        poll_interval: Duration,
        mut stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        // The watcher is in place before this returns, so no change after start is missed.
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let watcher = watch_dir(&self.dir, tx);
        tokio::spawn(async move {
            let _watcher = watcher;
            #[cfg(unix)]
            let mut hup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(poll_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                #[cfg(unix)]
                let hup_recv = async {
                    match hup.as_mut() {
                        Some(h) => {
                            h.recv().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                #[cfg(not(unix))]
                let hup_recv = std::future::pending::<()>();
                let trigger = tokio::select! {
                    _ = rx.recv() => {
                        // Debounce: a secret update touches several files.
                        tokio::time::sleep(DEBOUNCE).await;
                        while rx.try_recv().is_ok() {}
                        "file change"
                    }
                    _ = hup_recv => "SIGHUP",
                    _ = tick.tick() => "periodic check",
                    _ = stop.changed() => break,
                };
                let me = self.clone();
                let trigger_owned = trigger.to_string();
                let _ = tokio::task::spawn_blocking(move || {
                    let now = OffsetDateTime::now_utc();
                    let result = me.reload(now);
                    me.record(&result, &trigger_owned);
                    if trigger_owned == "periodic check" {
                        if let Err(e) = me.renew_self_signed_if_due(now) {
                            error!(error = %e, "self-signed root renewal failed");
                        }
                        me.check_expiry(now);
                    }
                })
                .await;
            }
        })
    }
}

/// Whether the cacerts directory exists; an error when it exists but cannot
/// be read, or holds a bundle file that cannot be looked at (a directory
/// without search permission): those would otherwise look like "no bundle".
pub(crate) fn probe_cacerts_dir(dir: &std::path::Path) -> Result<bool, ReloadError> {
    let unreadable = |reason: String| ReloadError::CacertsDirUnreadable {
        dir: dir.display().to_string(),
        reason,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(unreadable(e.to_string())),
    };
    for entry in entries {
        let entry = entry.map_err(|e| unreadable(e.to_string()))?;
        let name = entry.file_name();
        if !crate::ca::bundle::BUNDLE_FILES.iter().any(|f| name == *f) {
            continue;
        }
        if let Err(e) = std::fs::metadata(entry.path()) {
            // A dangling Kubernetes `..data` link is reported by the load.
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(unreadable(format!("{}: {e}", name.to_string_lossy())));
            }
        }
    }
    Ok(true)
}

/// `bundle` with the roots of `--extra-trust-roots` appended.
pub(crate) fn with_extra_roots(
    bundle: CaBundle,
    file: Option<&std::path::Path>,
) -> Result<CaBundle, ReloadError> {
    let Some(file) = file else {
        return Ok(bundle);
    };
    let text = crate::ca::bundle::read_pem_file(file)?;
    Ok(bundle.with_extra_trust_roots(&file.display().to_string(), &text)?)
}

/// The first look at the cacerts directory (does it exist, and its bundle
/// files), bounded like a reload's read by [`READ_DEADLINE`]: a hung mount
/// fails the start with an error instead of hanging it before it serves.
pub(crate) fn read_at_start(
    dir: &std::path::Path,
) -> Result<(bool, Option<BundleFiles>), ReloadError> {
    read_at_start_within(dir, READ_DEADLINE, |dir| {
        let exists = probe_cacerts_dir(dir)?;
        Ok((exists, crate::ca::bundle::read_files(dir)?))
    })
}

fn read_at_start_within(
    dir: &std::path::Path,
    deadline: Duration,
    read: impl FnOnce(&std::path::Path) -> Result<(bool, Option<BundleFiles>), ReloadError>
    + Send
    + 'static,
) -> Result<(bool, Option<BundleFiles>), ReloadError> {
    let owned = dir.to_path_buf();
    match with_deadline(&Arc::new(AtomicBool::new(false)), deadline, move || {
        read(&owned)
    }) {
        Deadline::Done(r) => r,
        Deadline::TimedOut | Deadline::Busy => Err(ReloadError::StartReadStuck {
            dir: dir.display().to_string(),
            after: deadline,
        }),
    }
}

/// What [`with_deadline`] got.
#[derive(Debug, PartialEq, Eq)]
enum Deadline<T> {
    Done(T),
    /// `f` did not return in time; it keeps running and `stuck` stays set
    /// until it does.
    TimedOut,
    /// An earlier call is still stuck: `f` was not started.
    Busy,
}

/// Runs `f` on its own thread and waits at most `deadline`. A blocked system
/// call cannot be cancelled, so a timed-out thread is left to finish; `stuck`
/// bounds them to one.
fn with_deadline<T: Send + 'static>(
    stuck: &Arc<AtomicBool>,
    deadline: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Deadline<T> {
    if stuck.load(Ordering::Acquire) {
        return Deadline::Busy;
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let flag = stuck.clone();
    let spawned = std::thread::Builder::new()
        .name("plugca-bundle-read".into())
        .spawn(move || {
            let out = f();
            flag.store(false, Ordering::Release);
            let _ = tx.send(out);
        });
    if spawned.is_err() {
        return Deadline::Busy;
    }
    match rx.recv_timeout(deadline) {
        Ok(out) => Deadline::Done(out),
        Err(_) => {
            stuck.store(true, Ordering::Release);
            // It may have finished between the timeout and the store.
            match rx.try_recv() {
                Ok(out) => {
                    stuck.store(false, Ordering::Release);
                    Deadline::Done(out)
                }
                Err(_) => Deadline::TimedOut,
            }
        }
    }
}

/// Watches `dir` (not recursively: Kubernetes swaps the `..data` symlink in it).
fn watch_dir(dir: &std::path::Path, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let mut watcher = match notify::recommended_watcher(
        move |res: notify::Result<notify::Event>| {
            if let Ok(event) = res
                && !event.kind.is_access()
            {
                let _ = tx.try_send(());
            }
        },
    ) {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "cannot create a file watcher; relying on periodic checks and SIGHUP");
            return None;
        }
    };
    if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
        warn!(dir = %dir.display(), error = %e, "cannot watch the cacerts directory; relying on periodic checks and SIGHUP");
        return None;
    }
    Some(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_read_past_its_deadline_fails_the_start_naming_the_dir() {
        let err = read_at_start_within(
            std::path::Path::new("/hung/cacerts"),
            Duration::from_millis(50),
            |_| {
                std::thread::sleep(Duration::from_secs(2));
                Ok((true, None))
            },
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "/hung/cacerts: reading the CA bundle files at start did not finish within 50ms (hung mount?); not starting"
        );
        assert!(matches!(
            read_at_start_within(std::path::Path::new("/x"), Duration::from_secs(5), |_| Ok(
                (false, None)
            )),
            Ok((false, None))
        ));
    }

    #[test]
    fn a_read_past_its_deadline_is_reported_and_no_second_one_starts() {
        let stuck = Arc::new(AtomicBool::new(false));
        assert_eq!(
            with_deadline(&stuck, Duration::from_secs(5), || 7),
            Deadline::Done(7)
        );
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let blocked = with_deadline(&stuck, Duration::from_millis(50), move || {
            let _ = wait.recv();
        });
        assert_eq!(blocked, Deadline::TimedOut);
        assert!(stuck.load(Ordering::Acquire));
        assert_eq!(
            with_deadline(&stuck, Duration::from_secs(5), || 1),
            Deadline::Busy,
            "no second thread while one is stuck"
        );
        release.send(()).unwrap();
        for _ in 0..500 {
            if !stuck.load(Ordering::Acquire) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            with_deadline(&stuck, Duration::from_secs(5), || 2),
            Deadline::Done(2),
            "reads start again once the stuck one returned"
        );
    }
}
