//! The audit line of one request (`target: plugca::audit`), built once from
//! what the handler ended with: the final caller and the CA key that signed.
//! Issuances are logged at INFO and refusals at WARN: the log queue
//! (`crate::logging`) tells the two kinds apart by that when it counts drops.

use tonic::Request;
use tracing::{info, warn};

use crate::authn::Caller;
use crate::issuance::Issued;
use crate::metrics::AuthnKind;
use crate::pb::IstioCertificateRequest;
use crate::server::error::ServiceError;

/// Non-secret facts about one request, for its audit line.
pub(super) struct Audit<'a> {
    caller: Option<&'a Caller>,
    cluster: String,
    peer: String,
    ca_key_id: Option<&'a str>,
}

impl<'a> Audit<'a> {
    pub(super) fn new(
        request: &Request<IstioCertificateRequest>,
        caller: Option<&'a Caller>,
        ca_key_id: Option<&'a str>,
    ) -> Self {
        let cluster = request
            .metadata()
            .get("clusterid")
            .and_then(|v| v.to_str().ok())
            .map(|c| c.chars().take(64).collect())
            .unwrap_or_else(|| "-".into());
        Audit {
            caller,
            cluster,
            peer: request
                .remote_addr()
                .map_or_else(|| "-".into(), |a| a.to_string()),
            ca_key_id,
        }
    }

    pub(super) fn issued(&self, issued: &Issued, faults: usize) {
        let sans: Vec<String> = issued.sans.iter().map(ToString::to_string).collect();
        info!(
            target: crate::logging::AUDIT_TARGET,
            outcome = "issued",
            identity = %self.identity(),
            authn = %self.authn(),
            unproven = self.caller.is_some_and(|c| matches!(c.kind(), AuthnKind::trusted_csr)),
            cluster = %self.cluster,
            peer = %self.peer,
            sans = %sans.join(","),
            serial = %issued.leaf.serial_hex,
            not_before = %crate::ca::cert::rfc3339(issued.not_before),
            not_after = %crate::ca::cert::rfc3339(issued.not_after),
            ca_key_id = %self.ca_key_id.unwrap_or("-"),
            faults,
            "certificate issued"
        );
    }

    /// `suppressed_before`: refusal lines not written (over the rate) since
    /// the previous one that was.
    pub(super) fn refused(&self, error: &ServiceError, code: tonic::Code, suppressed_before: u64) {
        warn!(
            target: crate::logging::AUDIT_TARGET,
            outcome = "refused",
            code = ?code,
            reason = %error.reason(),
            identity = %self.identity(),
            authn = %self.authn(),
            cluster = %self.cluster,
            peer = %self.peer,
            ca_key_id = %self.ca_key_id.unwrap_or("-"),
            suppressed_before,
            "CreateCertificate refused"
        );
    }

    fn identity(&self) -> String {
        self.caller
            .map_or_else(|| "-".into(), Caller::identity_list)
    }

    fn authn(&self) -> &str {
        self.caller.map_or("-", |c| c.detail())
    }
}
