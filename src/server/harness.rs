//! Test harnesses only: fault injection (make the CA misbehave on purpose, the
//! ways real CAs and networks do, so clients' error handling can be tested) and
//! a record of every certificate issued. Off unless `--enable-fault-injection`
//! is given or the `testing` API is used.
//!
//! [`Harness`] wraps the plain handler: it refuses before authentication, turns
//! the faults that shape signing into plain data ([`Overrides`]), and cuts the
//! chain after issuance.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::{Request, Status};

use crate::duration;
use crate::issuance::{Issued, LeafOverrides};
use crate::pb::IstioCertificateRequest;
use crate::server::CertificateService;

/// One way to misbehave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Refuse the request with this gRPC status.
    Refuse { code: tonic::Code, message: String },
    /// Answer with an empty `cert_chain`.
    EmptyChain,
    /// Answer with the leaf only (no root element).
    LeafOnly,
    /// Hold the signing slot this long before signing (a slow signer).
    Latency(Duration),
    /// Issue a leaf that expired an hour ago.
    Expired,
    /// Issue a leaf that becomes valid in an hour.
    NotYetValid,
    /// Issue a leaf with this lifetime, whatever was asked.
    ShortTtl(Duration),
    /// Sign a freshly generated key instead of the CSR's.
    WrongKey,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid fault {spec:?}: {reason} (expected one of refuse:<grpc code>[:message], empty-chain, leaf-only, latency:<duration>, expired, not-yet-valid, ttl:<duration>, wrong-key)"
)]
pub struct FaultParseError {
    pub spec: String,
    pub reason: String,
}

impl std::str::FromStr for Fault {
    type Err = FaultParseError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| FaultParseError {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let (name, arg) = match spec.trim().split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (spec.trim(), None),
        };
        let dur = |a: Option<&str>| -> Result<Duration, FaultParseError> {
            duration::parse(a.ok_or_else(|| err("missing duration"))?)
                .map_err(|e| err(&e.to_string()))
        };
        Ok(match name {
            "refuse" => {
                let arg = arg.ok_or_else(|| err("missing gRPC code"))?;
                let (code, message) = arg.split_once(':').unwrap_or((arg, "injected fault"));
                Fault::Refuse {
                    code: parse_code(code).ok_or_else(|| err("unknown gRPC code"))?,
                    message: message.to_string(),
                }
            }
            "empty-chain" => Fault::EmptyChain,
            "leaf-only" => Fault::LeafOnly,
            "latency" => Fault::Latency(dur(arg)?),
            "expired" => Fault::Expired,
            "not-yet-valid" => Fault::NotYetValid,
            "ttl" => Fault::ShortTtl(dur(arg)?),
            "wrong-key" => Fault::WrongKey,
            _ => return Err(err("unknown fault")),
        })
    }
}

/// Refuses a `ttl:` fault longer than `max_ttl`, naming both.
pub fn check_ttl(faults: &[Fault], max_ttl: Option<Duration>) -> Result<(), String> {
    let Some(max) = max_ttl else {
        return Ok(());
    };
    for f in faults {
        if let Fault::ShortTtl(d) = f
            && *d > max
        {
            return Err(format!(
                "fault ttl:{} is longer than --max-ttl {}: fault injection cannot issue what policy forbids",
                crate::duration::format_go(*d),
                crate::duration::format_go(max)
            ));
        }
    }
    Ok(())
}

/// gRPC code by name (`unavailable`, `UNAVAILABLE`, `resource-exhausted`) or number.
pub fn parse_code(text: &str) -> Option<tonic::Code> {
    if let Ok(n) = text.parse::<i32>() {
        let code = tonic::Code::from_i32(n);
        return (code != tonic::Code::Unknown || n == 2).then_some(code);
    }
    let norm = text.to_ascii_lowercase().replace(['-', '_'], "");
    (0..=16)
        .map(tonic::Code::from_i32)
        .find(|c| format!("{c:?}").to_ascii_lowercase() == norm)
}

/// The faults in force: global ones apply to every request, queued ones to the
/// next requests, one set each.
#[derive(Debug, Default)]
pub struct Faults {
    global: Mutex<Vec<Fault>>,
    next: Mutex<VecDeque<Vec<Fault>>>,
    /// `--max-ttl`: the admin endpoints refuse `ttl:` faults above it (the
    /// signer clamps them as well).
    max_ttl: Option<Duration>,
}

impl Faults {
    /// Faults whose `ttl:` may not exceed `max_ttl`.
    pub fn with_max_ttl(max_ttl: Duration) -> Self {
        Faults {
            max_ttl: Some(max_ttl),
            ..Faults::default()
        }
    }

    /// Refuses a `ttl:` fault longer than `--max-ttl`.
    pub fn check(&self, faults: &[Fault]) -> Result<(), String> {
        check_ttl(faults, self.max_ttl)
    }

    pub fn set_global(&self, faults: Vec<Fault>) {
        *self.global.lock().unwrap_or_else(|p| p.into_inner()) = faults;
    }

    /// Applies `faults` to the next request only (queued after earlier ones).
    pub fn push_next(&self, faults: Vec<Fault>) {
        self.next
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(faults);
    }

    pub fn clear(&self) {
        self.set_global(Vec::new());
        self.next.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    pub fn global(&self) -> Vec<Fault> {
        self.global
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The faults for one request: the next queued set plus the global ones.
    pub fn take_for_request(&self) -> Vec<Fault> {
        let mut faults = self
            .next
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
            .unwrap_or_default();
        faults.extend(self.global());
        faults
    }
}

/// Every certificate issued, kept for test harnesses to inspect (bounded).
#[derive(Debug, Default)]
pub struct IssuedLog {
    entries: Mutex<VecDeque<IssuedRecord>>,
}

/// One issued certificate as a harness sees it.
#[derive(Debug, Clone)]
pub struct IssuedRecord {
    pub leaf_pem: String,
    pub cert_chain: Vec<String>,
    pub sans: Vec<String>,
    pub serial_hex: String,
}

impl IssuedLog {
    /// Most records kept; the oldest are dropped first.
    pub const CAPACITY: usize = 10_000;

    fn record(&self, issued: &Issued) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() == Self::CAPACITY {
            entries.pop_front();
        }
        entries.push_back(IssuedRecord {
            leaf_pem: issued.leaf.pem.clone(),
            cert_chain: issued.cert_chain.clone(),
            sans: issued.sans.iter().map(ToString::to_string).collect(),
            serial_hex: issued.leaf.serial_hex.clone(),
        });
    }

    pub fn all(&self) -> Vec<IssuedRecord> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// What a harness changes about one request, as plain data for the handler.
/// [`Overrides::NONE`] changes nothing.
#[derive(Debug, Clone)]
pub struct Overrides {
    /// Refuse with this status before authentication.
    pub refuse: Option<Status>,
    /// Hold the signing slot this long before signing (a slow signer).
    pub slow_signing: Duration,
    pub leaf: LeafOverrides,
    /// How many faults apply (for the audit line).
    pub faults: usize,
}

impl Overrides {
    pub const NONE: Overrides = Overrides {
        refuse: None,
        slow_signing: Duration::ZERO,
        leaf: LeafOverrides::NONE,
        faults: 0,
    };

    /// The first refusal wins; latencies add up; leaf faults combine.
    pub fn from_faults(faults: &[Fault]) -> Self {
        let mut o = Overrides {
            faults: faults.len(),
            ..Overrides::NONE
        };
        for f in faults {
            match f {
                Fault::Refuse { code, message } => {
                    o.refuse = o
                        .refuse
                        .or_else(|| Some(Status::new(*code, message.clone())));
                }
                Fault::Latency(d) => o.slow_signing += *d,
                Fault::Expired => o.leaf.expired = true,
                Fault::NotYetValid => o.leaf.not_yet_valid = true,
                Fault::ShortTtl(d) => o.leaf.lifetime = Some(*d),
                Fault::WrongKey => o.leaf.wrong_key = true,
                Fault::EmptyChain | Fault::LeafOnly => {}
            }
        }
        o
    }
}

/// The harness around the plain handler: faults in, issued certificates recorded.
#[derive(Debug)]
pub(super) struct Harness {
    faults: Arc<Faults>,
    issued_log: Option<Arc<IssuedLog>>,
}

impl Harness {
    /// `None` (the plain handler) unless fault injection or the log is enabled.
    pub(super) fn new(
        faults: Option<Arc<Faults>>,
        issued_log: Option<Arc<IssuedLog>>,
    ) -> Option<Self> {
        if faults.is_none() && issued_log.is_none() {
            return None;
        }
        Some(Harness {
            faults: faults.unwrap_or_default(),
            issued_log,
        })
    }

    /// Serves one request with this request's faults applied around `service`.
    pub(super) async fn serve(
        &self,
        service: &CertificateService,
        request: &Request<IstioCertificateRequest>,
    ) -> Result<Issued, Status> {
        let faults = self.faults.take_for_request();
        let mut issued = service
            .serve(request, &Overrides::from_faults(&faults))
            .await?;
        for fault in &faults {
            match fault {
                Fault::EmptyChain => issued.cert_chain.clear(),
                Fault::LeafOnly => issued.cert_chain.truncate(1),
                _ => {}
            }
        }
        if let Some(log) = &self.issued_log {
            log.record(&issued);
        }
        Ok(issued)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_specs_parse() {
        assert_eq!(
            "refuse:unavailable".parse::<Fault>().unwrap(),
            Fault::Refuse {
                code: tonic::Code::Unavailable,
                message: "injected fault".into()
            }
        );
        assert_eq!(
            "refuse:RESOURCE_EXHAUSTED:busy".parse::<Fault>().unwrap(),
            Fault::Refuse {
                code: tonic::Code::ResourceExhausted,
                message: "busy".into()
            }
        );
        assert_eq!(
            "refuse:14".parse::<Fault>().unwrap(),
            Fault::Refuse {
                code: tonic::Code::Unavailable,
                message: "injected fault".into()
            }
        );
        assert_eq!(
            "latency:250ms".parse::<Fault>().unwrap(),
            Fault::Latency(Duration::from_millis(250))
        );
        assert_eq!(
            "ttl:5s".parse::<Fault>().unwrap(),
            Fault::ShortTtl(Duration::from_secs(5))
        );
        for s in [
            "empty-chain",
            "leaf-only",
            "expired",
            "not-yet-valid",
            "wrong-key",
        ] {
            assert!(s.parse::<Fault>().is_ok(), "{s}");
        }
        for bad in ["refuse", "refuse:nope", "latency", "latency:x", "explode"] {
            assert!(bad.parse::<Fault>().is_err(), "{bad}");
        }
    }

    #[test]
    fn queued_faults_apply_once_and_global_ones_always() {
        let f = Faults::default();
        f.set_global(vec![Fault::LeafOnly]);
        f.push_next(vec![Fault::Expired]);
        assert_eq!(f.take_for_request(), vec![Fault::Expired, Fault::LeafOnly]);
        assert_eq!(f.take_for_request(), vec![Fault::LeafOnly]);
        f.clear();
        assert!(f.take_for_request().is_empty());
    }
}
