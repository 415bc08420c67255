//! Impersonation (`ImpersonatedIdentity` request metadata; ztunnel in shared
//! mode asks for the certificates of the workloads on its node).
//!
//! Allowed only for callers that proved a service account listed in
//! `--trusted-node-accounts`, and then only for identities that an
//! authorizer vouches for: the impersonation policy file (labs without
//! Kubernetes) and/or Kubernetes node authorization (a pod of the target
//! service account runs on the caller's node). With both configured both must
//! agree. Every refusal is one [`ImpersonationError`] variant that names the
//! exact reason for the log; on the wire it stays istiod's opaque message.

pub mod node;
pub mod policy;

use std::fmt;
use std::str::FromStr;

use crate::authn::Caller;
use crate::identity::{SpiffeId, TrustDomain};
use crate::impersonation::node::{NodeAuthError, NodeAuthorizer};
use crate::impersonation::policy::{Pattern, Policy};

/// A `namespace/service-account` allowed to impersonate (`--trusted-node-accounts`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeAccount {
    pub namespace: String,
    pub service_account: String,
}

impl NodeAccount {
    /// Kubernetes name rules (RFC 1123), so a name cannot smuggle `/` or `*`.
    pub(crate) fn check_name(name: &str, kind: &str) -> Result<(), String> {
        let td = TrustDomain::parse("x").expect("a constant, valid trust domain");
        let (ns, sa) = if kind == "namespace" {
            (name, "x")
        } else {
            ("x", name)
        };
        SpiffeId::workload(&td, ns, sa)
            .map(|_| ())
            .map_err(|_| format!("{name:?} is not a valid Kubernetes {kind} name"))
    }
}

impl FromStr for NodeAccount {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (ns, sa) = s
            .split_once('/')
            .ok_or_else(|| "not namespace/service-account".to_string())?;
        NodeAccount::check_name(ns, "namespace")?;
        NodeAccount::check_name(sa, "service account")?;
        Ok(NodeAccount {
            namespace: ns.to_string(),
            service_account: sa.to_string(),
        })
    }
}

impl fmt::Display for NodeAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

/// Why an impersonation request was refused. Logged, never sent to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImpersonationError {
    #[error(
        "caller asked to impersonate {requested:?} but impersonation is not configured (--trusted-node-accounts is empty)"
    )]
    NotConfigured { requested: String },
    #[error(
        "caller {caller} ({how}) has no service-account proof; impersonation needs a service-account token"
    )]
    NoServiceAccountProof { caller: String, how: String },
    #[error(
        "caller {caller} (service account {account}) is not allowed to impersonate: not in --trusted-node-accounts ({trusted})"
    )]
    NotTrusted {
        caller: String,
        account: String,
        trusted: String,
    },
    #[error("failed to validate impersonated identity {requested:?}: {reason}")]
    InvalidTarget { requested: String, reason: String },
    #[error("caller {caller} may not impersonate {target}: policy allows {allowed}")]
    PolicyDenied {
        caller: String,
        target: String,
        allowed: String,
    },
    #[error("caller {caller} may not impersonate {target}: {reason}")]
    Node {
        caller: String,
        target: String,
        reason: Box<NodeAuthError>,
    },
}

impl ImpersonationError {
    /// The authorizer cannot decide yet (pod cache not synced): UNAVAILABLE.
    pub fn is_transient(&self) -> bool {
        matches!(self, ImpersonationError::Node { reason, .. } if reason.is_transient())
    }
}

/// The impersonation rules of a server.
#[derive(Debug, Default)]
pub struct Impersonation {
    trusted: Vec<NodeAccount>,
    policy: Option<Policy>,
    node: Option<NodeAuthorizer>,
}

impl Impersonation {
    /// Impersonation refused for everyone (no trusted node accounts).
    pub fn disabled() -> Self {
        Impersonation::default()
    }

    /// Trusted callers whose targets `policy` restricts.
    pub fn with_policy(trusted: Vec<NodeAccount>, policy: Policy) -> Self {
        Impersonation::new(trusted, Some(policy), None)
    }

    /// Trusted callers whose targets the policy and/or node authorization
    /// check; with both, both must allow.
    pub fn new(
        trusted: Vec<NodeAccount>,
        policy: Option<Policy>,
        node: Option<NodeAuthorizer>,
    ) -> Self {
        Impersonation {
            trusted,
            policy,
            node,
        }
    }

    /// The node authorizer, when Kubernetes node authorization is on.
    pub fn node_authorizer(&self) -> Option<&NodeAuthorizer> {
        self.node.as_ref()
    }

    pub fn is_enabled(&self) -> bool {
        !self.trusted.is_empty()
    }

    /// Checks that `caller` may impersonate `requested` and returns the caller
    /// the certificate is issued to: exactly the requested identity.
    ///
    /// `caller` is `None` when no authenticator accepted the request (lab mode).
    pub fn authorize(
        &self,
        caller: Option<&Caller>,
        requested: &str,
    ) -> Result<Caller, ImpersonationError> {
        if self.trusted.is_empty() {
            return Err(ImpersonationError::NotConfigured {
                requested: requested.to_string(),
            });
        }
        let Some(caller) = caller else {
            return Err(ImpersonationError::NoServiceAccountProof {
                caller: "-".into(),
                how: "lab mode: identity taken from the CSR".into(),
            });
        };
        let who = caller.identity_list();
        let Some(sa) = caller.service_account() else {
            return Err(ImpersonationError::NoServiceAccountProof {
                caller: who,
                how: caller.detail().to_string(),
            });
        };
        let account = NodeAccount {
            namespace: sa.namespace.clone(),
            service_account: sa.name.clone(),
        };
        if !self.trusted.contains(&account) {
            return Err(ImpersonationError::NotTrusted {
                caller: who,
                account: account.to_string(),
                trusted: join(&self.trusted),
            });
        }
        let target = parse_target(requested)?;
        let (ns, target_sa) = target
            .namespace_and_service_account()
            .expect("parse_target checked the /ns/<ns>/sa/<sa> shape");
        if let Some(policy) = &self.policy
            && !policy.allows(&account, ns, target_sa)
        {
            let allowed = policy.allowed_for(&account);
            return Err(ImpersonationError::PolicyDenied {
                caller: who,
                target: format!("{ns}/{target_sa}"),
                allowed: if allowed.is_empty() {
                    "nothing for this caller".into()
                } else {
                    join::<Pattern>(allowed)
                },
            });
        }
        if let Some(node) = &self.node {
            node.authorize(sa, ns, target_sa)
                .map_err(|reason| ImpersonationError::Node {
                    caller: who.clone(),
                    target: format!("{ns}/{target_sa}"),
                    reason: Box::new(reason),
                })?;
        }
        Ok(caller.impersonating(&target))
    }
}

/// `spiffe://<td>/ns/<ns>/sa/<sa>` with valid Kubernetes names. The trust
/// domain is not compared with ours (istiod does not either: ztunnel asks for
/// workloads of any trust domain it serves).
fn parse_target(requested: &str) -> Result<SpiffeId, ImpersonationError> {
    let invalid = |reason: String| ImpersonationError::InvalidTarget {
        requested: requested.chars().take(256).collect(),
        reason,
    };
    let id = SpiffeId::parse(requested).map_err(|e| invalid(e.to_string()))?;
    let (ns, sa) = id
        .namespace_and_service_account()
        .ok_or_else(|| invalid("not of the form spiffe://<td>/ns/<ns>/sa/<sa>".into()))?;
    let td = TrustDomain::parse(id.trust_domain()).map_err(|e| invalid(e.to_string()))?;
    SpiffeId::workload(&td, ns, sa).map_err(|e| invalid(e.to_string()))?;
    Ok(id)
}

fn join<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::ServiceAccount;
    use crate::metrics::AuthnKind;
    use std::path::Path;

    const ZTUNNEL: &str = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";

    fn ztunnel_caller() -> Caller {
        Caller::for_tests(
            &[ZTUNNEL],
            AuthnKind::jwt,
            "JWT",
            Some(ServiceAccount {
                namespace: "istio-system".into(),
                name: "ztunnel".into(),
                pod: None,
                cluster_id: None,
            }),
        )
    }

    fn trusted() -> Vec<NodeAccount> {
        vec!["istio-system/ztunnel".parse().unwrap()]
    }

    fn with_policy(json: &str) -> Impersonation {
        Impersonation::with_policy(
            trusted(),
            Policy::parse(json.as_bytes(), Path::new("p.json"), &trusted()).unwrap(),
        )
    }

    #[test]
    fn node_accounts_need_a_slash_and_valid_names() {
        assert_eq!(
            "istio-system/ztunnel".parse::<NodeAccount>().unwrap(),
            NodeAccount {
                namespace: "istio-system".into(),
                service_account: "ztunnel".into()
            }
        );
        assert_eq!(
            "ztunnel".parse::<NodeAccount>().unwrap_err(),
            "not namespace/service-account"
        );
        for bad in ["/ztunnel", "istio-system/", "a/b/c", "Istio/x", "a.b/x"] {
            assert!(bad.parse::<NodeAccount>().is_err(), "{bad}");
        }
    }

    #[test]
    fn impersonation_without_trusted_accounts_is_not_configured() {
        let e = Impersonation::disabled()
            .authorize(Some(&ztunnel_caller()), "spiffe://cluster.local/ns/a/sa/b")
            .unwrap_err();
        assert!(matches!(e, ImpersonationError::NotConfigured { .. }), "{e}");
    }

    #[test]
    fn an_allowed_target_becomes_the_only_identity() {
        let imp =
            with_policy(r#"[{"caller":"istio-system/ztunnel","may_impersonate":["ns-a/*"]}]"#);
        let c = imp
            .authorize(
                Some(&ztunnel_caller()),
                "spiffe://cluster.local/ns/ns-a/sa/sa-a",
            )
            .unwrap();
        assert_eq!(c.identities(), ["spiffe://cluster.local/ns/ns-a/sa/sa-a"]);
        assert!(c.detail().contains(ZTUNNEL), "{}", c.detail());
        assert!(c.service_account().is_none(), "no chained impersonation");
    }

    #[test]
    fn a_target_outside_the_policy_is_refused_naming_the_policy() {
        let imp =
            with_policy(r#"[{"caller":"istio-system/ztunnel","may_impersonate":["ns-a/*"]}]"#);
        let e = imp
            .authorize(
                Some(&ztunnel_caller()),
                "spiffe://cluster.local/ns/ns-b/sa/sa-b",
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("caller {ZTUNNEL} may not impersonate ns-b/sa-b: policy allows ns-a/*")
        );
    }

    #[test]
    fn an_untrusted_caller_is_refused_before_the_target_is_read() {
        let imp = with_policy("[]");
        let other = Caller::for_tests(
            &["spiffe://cluster.local/ns/default/sa/sleep"],
            AuthnKind::jwt,
            "JWT",
            Some(ServiceAccount {
                namespace: "default".into(),
                name: "sleep".into(),
                pod: None,
                cluster_id: None,
            }),
        );
        let e = imp.authorize(Some(&other), "junk").unwrap_err();
        assert_eq!(
            e.to_string(),
            "caller spiffe://cluster.local/ns/default/sa/sleep (service account default/sleep) is not allowed to impersonate: not in --trusted-node-accounts (istio-system/ztunnel)"
        );
    }

    #[test]
    fn callers_without_a_service_account_proof_cannot_impersonate() {
        let imp = with_policy(r#"[{"caller":"istio-system/ztunnel","may_impersonate":["*/*"]}]"#);
        let cert = Caller::for_tests(
            &[ZTUNNEL],
            AuthnKind::client_cert,
            "client certificate serial 01",
            None,
        );
        let target = "spiffe://cluster.local/ns/a/sa/b";
        assert!(matches!(
            imp.authorize(Some(&cert), target),
            Err(ImpersonationError::NoServiceAccountProof { .. })
        ));
        assert!(matches!(
            imp.authorize(None, target),
            Err(ImpersonationError::NoServiceAccountProof { .. })
        ));
    }

    #[test]
    fn targets_must_be_istio_workload_identities() {
        let imp = with_policy(r#"[{"caller":"istio-system/ztunnel","may_impersonate":["*/*"]}]"#);
        for bad in [
            "not-spiffe-idenditity",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/x/a/sa/b",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/A/sa/b",
            "spiffe://cluster.local/ns/a.b/sa/b",
            "spiffe://Cluster.local/ns/a/sa/b",
        ] {
            assert!(
                matches!(
                    imp.authorize(Some(&ztunnel_caller()), bad),
                    Err(ImpersonationError::InvalidTarget { .. })
                ),
                "{bad}"
            );
        }
        // Another trust domain is accepted, as istiod does.
        assert!(
            imp.authorize(Some(&ztunnel_caller()), "spiffe://other.td/ns/a/sa/b")
                .is_ok()
        );
    }
}
