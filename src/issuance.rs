//! The CreateCertificate policy, free of gRPC: TTL rules (spec section 5), the
//! leaf subject and SANs from the authenticated caller, and the response chain.

use std::time::Duration;

use time::OffsetDateTime;

use crate::asn1::GeneralName;
use crate::authn::Caller;
use crate::ca::{CaBundle, IssuedLeaf, LeafSpec, SignError};
use crate::csr::VerifiedCsr;
use crate::duration::format_go;

/// NotBefore is back-dated by this much for clock skew (istiod's grace period).
pub const CLOCK_SKEW_GRACE: Duration = Duration::from_secs(120);
/// Short lifetimes are back-dated by at most this fraction of the lifetime.
pub const MAX_BACKDATE_FRACTION: u32 = 4;

/// TTL limits.
#[derive(Debug, Clone, Copy)]
pub struct TtlPolicy {
    pub default_ttl: Duration,
    pub max_ttl: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssueError {
    #[error("requested TTL {} is greater than the max allowed TTL {}", format_go(*requested), format_go(*max))]
    Ttl { requested: Duration, max: Duration },
    #[error("signing certificate has expired at {}", go_time(*at))]
    SignerExpired { at: OffsetDateTime },
    #[error("{0}")]
    Sign(#[from] SignError),
}

/// A leaf plus the full response.
#[derive(Debug, Clone)]
pub struct Issued {
    pub leaf: IssuedLeaf,
    pub cert_chain: Vec<String>,
    pub sans: Vec<GeneralName>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// The lifetime for a requested `validity_duration` (seconds; <= 0 means default).
pub fn lifetime(requested_secs: i64, policy: &TtlPolicy) -> Result<Duration, IssueError> {
    if requested_secs <= 0 {
        return Ok(policy.default_ttl);
    }
    let requested = Duration::from_secs(requested_secs as u64);
    if requested > policy.max_ttl {
        return Err(IssueError::Ttl {
            requested,
            max: policy.max_ttl,
        });
    }
    Ok(requested)
}

/// How far NotBefore lies before now: istiod's 2 minutes, but at most a
/// quarter of the lifetime. istiod always back-dates 2 minutes, so for a TTL of
/// 2 minutes or less the client's half-life renewal point lies in the past and
/// it renews in a tight loop; for TTLs of 8 minutes and more this is istiod's value.
pub fn backdate(lifetime: Duration) -> Duration {
    CLOCK_SKEW_GRACE.min(lifetime / MAX_BACKDATE_FRACTION)
}

/// Validity window: NotBefore = now - [`backdate`]; NotAfter = now + lifetime,
/// never past the earliest NotAfter of the signing path.
pub fn validity(
    now: OffsetDateTime,
    lifetime: Duration,
    limit: OffsetDateTime,
) -> (OffsetDateTime, OffsetDateTime) {
    validity_backdated(now, lifetime, limit, backdate(lifetime))
}

fn validity_backdated(
    now: OffsetDateTime,
    lifetime: Duration,
    limit: OffsetDateTime,
    backdate: Duration,
) -> (OffsetDateTime, OffsetDateTime) {
    // Certificates carry whole seconds; truncate so NotAfter - NotBefore is exact.
    let now = now.replace_nanosecond(0).unwrap_or(now);
    let not_before = now - Duration::from_secs(backdate.as_secs());
    let wanted = now.checked_add(time::Duration::try_from(lifetime).unwrap_or(time::Duration::MAX));
    let not_after = match wanted {
        Some(t) if t < limit => t,
        _ => limit,
    };
    (not_before, not_after)
}

/// Deliberate deviations from the policy leaf, for test harnesses that need a
/// misbehaving CA. Plain data; [`LeafOverrides::NONE`] changes nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeafOverrides {
    /// This lifetime, whatever was asked (and without the TTL check).
    pub lifetime: Option<Duration>,
    /// A leaf that expired an hour ago.
    pub expired: bool,
    /// A leaf that becomes valid in an hour.
    pub not_yet_valid: bool,
    /// A freshly generated key instead of the CSR's.
    pub wrong_key: bool,
}

impl LeafOverrides {
    /// The policy leaf, unchanged.
    pub const NONE: LeafOverrides = LeafOverrides {
        lifetime: None,
        expired: false,
        not_yet_valid: false,
        wrong_key: false,
    };
}

/// Signs a leaf for `caller` with the public key of `csr`, after the TTL check.
pub fn issue(
    bundle: &CaBundle,
    caller: &Caller,
    csr: &VerifiedCsr,
    requested_secs: i64,
    policy: &TtlPolicy,
    overrides: &LeafOverrides,
    now: OffsetDateTime,
) -> Result<Issued, IssueError> {
    let lifetime = match overrides.lifetime {
        // A `ttl:` fault shortens or lengthens the leaf, but never past
        // --max-ttl: fault injection must not mint what policy forbids.
        Some(d) => d.min(policy.max_ttl),
        None => lifetime(requested_secs, policy)?,
    };
    let signing_not_after = bundle.signing_cert().not_after;
    if now >= signing_not_after {
        return Err(IssueError::SignerExpired {
            at: signing_not_after,
        });
    }
    // A `ttl:` fault shapes the leaf as istiod would (2-minute back-dating
    // whatever the lifetime): harnesses use it to reproduce istiod's edge cases.
    let back = match overrides.lifetime {
        Some(_) => CLOCK_SKEW_GRACE,
        None => backdate(lifetime),
    };
    let (mut not_before, mut not_after) =
        validity_backdated(now, lifetime, bundle.not_after_limit(), back);
    let hour = time::Duration::hours(1);
    if overrides.expired {
        (not_before, not_after) = (not_before - hour * 2, now - hour);
    }
    if overrides.not_yet_valid {
        (not_before, not_after) = (not_before + hour, not_after + hour);
    }
    let spec = LeafSpec::workload(caller, csr, (not_before, not_after));
    let stranger;
    let spec = if overrides.wrong_key {
        stranger = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IssueError::Sign(SignError::Rcgen(e.to_string())))?;
        spec.with_foreign_key(&stranger)
    } else {
        spec
    };
    let leaf = bundle.signer().issue(&spec)?;
    let mut cert_chain = Vec::with_capacity(1 + bundle.response_tail().len());
    cert_chain.push(leaf.pem.clone());
    cert_chain.extend(bundle.response_tail().iter().cloned());
    Ok(Issued {
        leaf,
        cert_chain,
        sans: spec.sans().to_vec(),
        not_before,
        not_after,
    })
}

/// Go's `time.Time.String()` layout for UTC, as istiod prints it in errors.
pub fn go_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} +0000 UTC",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn policy(default_h: u64, max_h: u64) -> TtlPolicy {
        TtlPolicy {
            default_ttl: HOUR * default_h as u32,
            max_ttl: HOUR * max_h as u32,
        }
    }

    #[test]
    fn zero_or_negative_ttl_means_the_default() {
        assert_eq!(lifetime(0, &policy(24, 2160)).unwrap(), HOUR * 24);
        assert_eq!(lifetime(-5, &policy(24, 2160)).unwrap(), HOUR * 24);
        assert_eq!(lifetime(i64::MIN, &policy(24, 2160)).unwrap(), HOUR * 24);
    }

    #[test]
    fn ttl_equal_to_max_is_allowed_and_above_is_refused_with_istio_text() {
        assert_eq!(lifetime(7200, &policy(1, 2)).unwrap(), HOUR * 2);
        let err = lifetime(10_800, &policy(1, 2)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "requested TTL 3h0m0s is greater than the max allowed TTL 2h0m0s"
        );
        assert!(lifetime(i64::MAX, &policy(1, 2)).is_err());
    }

    #[test]
    fn validity_is_backdated_and_clamped() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap()
            + time::Duration::milliseconds(400);
        let far = now + time::Duration::days(365);
        let (nb, na) = validity(now, Duration::from_secs(1800), far);
        assert_eq!((na - nb).whole_seconds(), 1800 + 120);
        let limit = now + time::Duration::hours(1);
        let (_, na) = validity(now, HOUR * 2, limit);
        assert_eq!(na, limit);
    }

    #[test]
    fn short_lifetimes_are_backdated_a_quarter_and_long_ones_two_minutes() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let far = now + time::Duration::days(365);
        for (ttl, back) in [
            (60, 15),
            (120, 30),
            (400, 100),
            (480, 120),
            (481, 120),
            (86_400, 120),
        ] {
            let (nb, na) = validity(now, Duration::from_secs(ttl), far);
            assert_eq!((now - nb).whole_seconds(), back, "ttl {ttl}");
            assert_eq!((na - now).whole_seconds(), ttl as i64, "ttl {ttl}");
        }
    }

    /// Property: for every lifetime the half-life renewal point (what
    /// istio-agent and ztunnel use) lies in the future, NotAfter is exactly
    /// now + lifetime (or the CA's limit), and from 8 minutes on the window
    /// is istiod's (lifetime + 2 min).
    #[test]
    fn the_renewal_point_of_every_lifetime_is_in_the_future() {
        let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let far = now + time::Duration::days(3650);
        let ttls = (1..=1_000u64)
            .chain((1_000..=200_000).step_by(997))
            .chain([2160 * 3600]);
        for ttl in ttls {
            let (nb, na) = validity(now, Duration::from_secs(ttl), far);
            let window = na - nb;
            assert!(
                nb + window / 2 > now,
                "ttl {ttl}: renewal point not in the future"
            );
            assert!(nb <= now, "ttl {ttl}");
            assert_eq!((na - now).whole_seconds(), ttl as i64, "ttl {ttl}");
            if ttl >= 480 {
                assert_eq!(window.whole_seconds(), ttl as i64 + 120, "ttl {ttl}");
            }
            let limit = now + time::Duration::seconds(ttl as i64 / 2);
            assert_eq!(
                validity(now, Duration::from_secs(ttl), limit).1,
                limit,
                "clamped"
            );
        }
    }

    #[test]
    fn go_time_layout() {
        let t = OffsetDateTime::from_unix_timestamp(0).unwrap();
        assert_eq!(go_time(t), "1970-01-01 00:00:00 +0000 UTC");
    }
}
