//! Leader election on a `coordination.k8s.io/v1` Lease: one replica writes
//! ConfigMaps and Secrets; every replica signs regardless.
//!
//! The Lease itself is taken and renewed by `kube-lease-manager` (server-side
//! apply, renewal [`RENEW_INTERVAL`] after the last one). On top of it this
//! module keeps a *fence*: the writers may write only while a read of the
//! Lease, at most [`LEASE_DURATION`] − [`RETRY_INTERVAL`] old, named this
//! replica as holder with a fresh `renewTime`. A renewal that hangs or fails
//! therefore stops the writers before another replica can take the Lease,
//! instead of when the crate next notices.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube_lease_manager::{LeaseCreateMode, LeaseManager, LeaseParams};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::controllers::metrics::{Controller, ControllerMetrics, ErrorKind};

/// How long a Lease stays valid after its last renewal (client-go's default is 15 s too).
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How soon after the last renewal the holder renews (the crate's
/// `duration - grace`): leaves two retries before the Lease expires.
pub const RENEW_INTERVAL: Duration = Duration::from_secs(10);
/// How often the fence re-reads the Lease, and the wait before retrying after an error.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(2);

/// Where the Lease lives and who we are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderConfig {
    pub namespace: String,
    pub lease_name: String,
    /// `POD_NAME`, else hostname-pid; see [`identity`].
    pub identity: String,
}

/// Whether this replica may write now. Cloned into each writer.
#[derive(Debug, Clone)]
pub struct Leadership {
    rx: watch::Receiver<bool>,
}

impl Leadership {
    /// A leadership that never changes (tests, and single-writer setups).
    pub fn fixed(leader: bool) -> (Self, watch::Sender<bool>) {
        let (tx, rx) = watch::channel(leader);
        (Leadership { rx }, tx)
    }

    pub fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// Waits for the next change; pends forever once the elector stopped.
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The identity written into the Lease: `POD_NAME` (unique per pod and shown
/// by `kubectl get lease`), else `hostname-pid`.
pub fn identity(pod_name: Option<&str>) -> String {
    match pod_name.map(str::trim).filter(|n| !n.is_empty()) {
        Some(name) => name.to_string(),
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "plugca".into());
            format!("{host}-{}", std::process::id())
        }
    }
}

/// Starts the elector. Leadership ends (and the Lease is released, so another
/// replica takes over at once) when `shutdown` flips.
pub fn spawn(
    client: kube::Client,
    config: LeaderConfig,
    metrics: Arc<ControllerMetrics>,
    mut shutdown: watch::Receiver<bool>,
) -> (Leadership, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let publish = |leader: bool| {
            let was = tx.send_replace(leader);
            metrics.leader.set(i64::from(leader));
            if was != leader {
                if leader {
                    info!(lease = %config.lease_name, namespace = %config.namespace, identity = %config.identity, "took the controllers' Lease: this replica now writes");
                } else {
                    info!(lease = %config.lease_name, namespace = %config.namespace, identity = %config.identity, "not the Lease holder: this replica does not write (signing is unaffected)");
                }
            }
        };
        let leases: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
        loop {
            let params = LeaseParams::new(
                config.identity.clone(),
                LEASE_DURATION.as_secs(),
                (LEASE_DURATION - RENEW_INTERVAL).as_secs(),
            );
            let manager = tokio::select! {
                m = LeaseManager::new(client.clone(), &config.lease_name, &config.namespace, params, LeaseCreateMode::AutoCreate) => m,
                _ = crate::controllers::stopped(&mut shutdown) => return,
            };
            let manager = match manager {
                Ok(m) => m,
                Err(e) => {
                    metrics.failed(Controller::leader_election, ErrorKind::lease);
                    warn!(lease = %config.lease_name, namespace = %config.namespace, error = %e, "cannot set up the Lease; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY_INTERVAL) => continue,
                        _ = crate::controllers::stopped(&mut shutdown) => return,
                    }
                }
            };
            let mut fence = Fence::default();
            let changed = manager.changed();
            tokio::pin!(changed);
            // First tick one interval in: a fresh manager takes a free Lease
            // itself, and a follower must not restart it before it could.
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + RETRY_INTERVAL,
                RETRY_INTERVAL,
            );
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let failed = loop {
                tokio::select! {
                    held = &mut changed => match held {
                        Ok(held) => {
                            fence.crate_changed(held, Instant::now());
                            changed.set(manager.changed());
                        }
                        Err(e) => break Some(e.to_string()),
                    },
                    _ = tick.tick() => {
                        let read = tokio::time::timeout(RETRY_INTERVAL, leases.get(&config.lease_name)).await;
                        if !fence.crate_leader() {
                            // The crate's follower sleeps until the expiry it last
                            // saw, even when the holder releases the Lease on
                            // shutdown: look ourselves, and restart the manager
                            // (which takes a free Lease at once) once it is released.
                            if let Ok(Ok(lease)) = read
                                && is_released(&lease)
                            {
                                break None;
                            }
                            continue;
                        }
                        match read {
                            Ok(Ok(lease)) => fence.observed(&observe(&lease, &config.identity, SystemTime::now()), Instant::now()),
                            Ok(Err(e)) => {
                                metrics.failed(Controller::leader_election, ErrorKind::lease);
                                warn!(error = %e, "cannot read the Lease to confirm leadership");
                            }
                            Err(_) => {
                                metrics.failed(Controller::leader_election, ErrorKind::lease);
                                warn!(timeout = ?RETRY_INTERVAL, "reading the Lease timed out");
                            }
                        }
                    }
                    _ = crate::controllers::stopped(&mut shutdown) => {
                        publish(false);
                        // Release so the next replica does not wait for expiry
                        // (its follower loop above notices within RETRY_INTERVAL).
                        let _ = tokio::time::timeout(RETRY_INTERVAL, manager.release()).await;
                        return;
                    }
                }
                publish(fence.is_leader(Instant::now()));
            };
            publish(false);
            let Some(failed) = failed else {
                info!(lease = %config.lease_name, namespace = %config.namespace, "the Lease was released by its holder: trying to take it now");
                continue;
            };
            metrics.failed(Controller::leader_election, ErrorKind::lease);
            warn!(lease = %config.lease_name, namespace = %config.namespace, error = %failed, "Lease renewal failed; writers stopped, retrying");
            tokio::select! {
                _ = tokio::time::sleep(RETRY_INTERVAL) => {}
                _ = crate::controllers::stopped(&mut shutdown) => return,
            }
        }
    });
    (Leadership { rx }, task)
}

/// Whether nobody holds `lease`: its holder released it (kube-lease-manager
/// clears `holderIdentity`) or it was never taken.
pub fn is_released(lease: &Lease) -> bool {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .is_none_or(str::is_empty)
}

/// What one read of the Lease said about us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// We hold it; the last renewal is this old (by our clock).
    Held { age: Duration },
    /// Someone else holds it, or nobody, or it has no renew time.
    NotHeld,
}

/// Reads holder and renew time of `lease` for `identity` at `now`.
pub fn observe(lease: &Lease, identity: &str, now: SystemTime) -> Observation {
    let Some(spec) = &lease.spec else {
        return Observation::NotHeld;
    };
    if spec.holder_identity.as_deref() != Some(identity) {
        return Observation::NotHeld;
    }
    let Some(renewed) = &spec.renew_time else {
        return Observation::NotHeld;
    };
    let renewed = SystemTime::UNIX_EPOCH
        + Duration::from_micros(u64::try_from(renewed.0.as_microsecond()).unwrap_or(0));
    // A renew time ahead of our clock (skew) counts as just renewed.
    Observation::Held {
        age: now.duration_since(renewed).unwrap_or(Duration::ZERO),
    }
}

/// The writers' fence: leader while the crate says so *and* a recent read
/// of the Lease showed our renewal young enough that nobody else can take it.
#[derive(Debug, Default, Clone)]
pub struct Fence {
    crate_leader: bool,
    valid_until: Option<Instant>,
}

impl Fence {
    /// Writing stops this long before the Lease would expire, as margin for
    /// clock skew between replicas and a late fence tick.
    pub const MARGIN: Duration = RETRY_INTERVAL;

    pub fn crate_leader(&self) -> bool {
        self.crate_leader
    }

    /// The crate reported a change: it has just taken (and written) the
    /// Lease, or lost it.
    pub fn crate_changed(&mut self, held: bool, now: Instant) {
        self.crate_leader = held;
        self.valid_until = held.then(|| now + (LEASE_DURATION - Self::MARGIN));
    }

    pub fn observed(&mut self, observation: &Observation, now: Instant) {
        self.valid_until = match observation {
            Observation::Held { age } => (LEASE_DURATION - Self::MARGIN)
                .checked_sub(*age)
                .map(|left| now + left),
            Observation::NotHeld => None,
        };
    }

    pub fn is_leader(&self, now: Instant) -> bool {
        self.crate_leader && self.valid_until.is_some_and(|t| now < t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    const S: Duration = Duration::from_secs(1);

    fn lease(holder: Option<&str>, renewed: Option<SystemTime>) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(String::from),
                renew_time: renewed.map(|t| {
                    let micros = t
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap()
                        .as_micros();
                    MicroTime(
                        k8s_openapi::jiff::Timestamp::from_microsecond(micros as i64).unwrap(),
                    )
                }),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        }
    }

    #[test]
    fn a_lease_without_holder_is_released() {
        assert!(is_released(&lease(None, None)));
        assert!(is_released(&lease(Some(""), Some(SystemTime::now()))));
        assert!(is_released(&Lease::default()));
        assert!(!is_released(&lease(Some("other"), Some(SystemTime::now()))));
    }

    #[test]
    fn the_timing_constants_leave_room_for_two_retries_before_expiry() {
        assert!(RENEW_INTERVAL + 2 * RETRY_INTERVAL < LEASE_DURATION);
        assert!(Fence::MARGIN < LEASE_DURATION - RENEW_INTERVAL);
    }

    #[test]
    fn a_lease_read_tells_holder_and_age() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(
            observe(&lease(Some("me"), Some(now - 3 * S)), "me", now),
            Observation::Held { age: 3 * S }
        );
        assert_eq!(
            observe(&lease(Some("other"), Some(now)), "me", now),
            Observation::NotHeld
        );
        assert_eq!(
            observe(&lease(None, Some(now)), "me", now),
            Observation::NotHeld
        );
        assert_eq!(
            observe(&lease(Some("me"), None), "me", now),
            Observation::NotHeld
        );
        assert_eq!(observe(&Lease::default(), "me", now), Observation::NotHeld);
        // Our clock behind the writer's: just renewed, not a huge age.
        assert_eq!(
            observe(&lease(Some("me"), Some(now + 2 * S)), "me", now),
            Observation::Held {
                age: Duration::ZERO
            }
        );
    }

    #[test]
    fn taking_the_lease_makes_a_leader_until_the_fence_runs_out() {
        let t0 = Instant::now();
        let mut f = Fence::default();
        assert!(!f.is_leader(t0));
        f.crate_changed(true, t0);
        assert!(f.is_leader(t0));
        assert!(f.is_leader(t0 + 12 * S));
        // No confirmed renewal: writing stops before the Lease could expire.
        assert!(!f.is_leader(t0 + LEASE_DURATION - Fence::MARGIN));
        assert!(!f.is_leader(t0 + LEASE_DURATION));
    }

    #[test]
    fn confirmed_renewals_extend_leadership() {
        let t0 = Instant::now();
        let mut f = Fence::default();
        f.crate_changed(true, t0);
        // Renewed at t0+10 s, read at t0+11 s.
        f.observed(&Observation::Held { age: S }, t0 + 11 * S);
        assert!(f.is_leader(t0 + 20 * S));
        assert!(!f.is_leader(t0 + 23 * S));
    }

    #[test]
    fn a_stale_renewal_or_another_holder_stops_the_writers_at_once() {
        let t0 = Instant::now();
        let mut f = Fence::default();
        f.crate_changed(true, t0);
        f.observed(&Observation::Held { age: 14 * S }, t0 + S);
        assert!(!f.is_leader(t0 + S));
        f.crate_changed(true, t0 + 2 * S);
        f.observed(&Observation::NotHeld, t0 + 3 * S);
        assert!(!f.is_leader(t0 + 3 * S));
        // The next read showing our fresh renewal restores it.
        f.observed(
            &Observation::Held {
                age: Duration::ZERO,
            },
            t0 + 5 * S,
        );
        assert!(f.is_leader(t0 + 5 * S));
    }

    #[test]
    fn losing_the_lease_in_the_crate_wins_over_a_fresh_read() {
        let t0 = Instant::now();
        let mut f = Fence::default();
        f.crate_changed(true, t0);
        f.crate_changed(false, t0 + S);
        f.observed(
            &Observation::Held {
                age: Duration::ZERO,
            },
            t0 + S,
        );
        assert!(!f.is_leader(t0 + S));
    }

    #[test]
    fn identity_is_the_pod_name_else_host_and_pid() {
        assert_eq!(identity(Some("plugca-7d9-abc")), "plugca-7d9-abc");
        let fallback = identity(Some("  "));
        assert!(
            fallback.ends_with(&format!("-{}", std::process::id())),
            "{fallback}"
        );
        assert_eq!(identity(None), fallback);
    }
}
