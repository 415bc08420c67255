//! Identities as the CA issues them: a strict [`TrustDomain`] and [`SpiffeId`],
//! plus Istio's `spiffe://<td>/ns/<ns>/sa/<sa>` workload form, and the
//! [`Identity`] a caller proves, one variant per SAN kind it is issued as.

use std::fmt;
use std::net::IpAddr;

/// Longest SPIFFE ID accepted (the SPIFFE spec's limit).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain accepted (a DNS name).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
const SCHEME: &str = "spiffe://";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    #[error("trust domain {0:?} is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong(String),
    #[error(
        "trust domain {0:?} has a character outside [a-z0-9._-] (SPIFFE trust domains are lower case)"
    )]
    TrustDomainCharacter(String),
    #[error("{0:?} does not start with spiffe://")]
    NotSpiffe(String),
    #[error("SPIFFE ID is longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    #[error("SPIFFE ID {0:?} has an empty path segment")]
    EmptySegment(String),
    #[error("SPIFFE ID {0:?} has a '.' or '..' path segment")]
    DotSegment(String),
    #[error("SPIFFE ID {0:?} has a character outside [A-Za-z0-9._-] in its path")]
    PathCharacter(String),
    #[error("SPIFFE ID {0:?} has no path")]
    NoPath(String),
    #[error("{0:?} is not a valid Kubernetes {1} name")]
    KubernetesName(String, &'static str),
    #[error("{0:?} is not a DNS name")]
    DnsName(String),
}

/// One identity a caller proved, as the SAN kind the leaf carries it as.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    Spiffe(SpiffeId),
    Dns(DnsName),
    Ip(IpAddr),
}

impl Identity {
    /// istiod's mapping of identity text: `spiffe://` -> SPIFFE ID (strict),
    /// IP literal -> IP address, anything else -> DNS name.
    pub fn parse(input: &str) -> Result<Self, IdentityError> {
        if input.starts_with(SCHEME) {
            return SpiffeId::parse(input).map(Identity::Spiffe);
        }
        if let Ok(ip) = input.parse() {
            return Ok(Identity::Ip(ip));
        }
        DnsName::parse(input).map(Identity::Dns)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Spiffe(id) => id.fmt(f),
            Identity::Dns(name) => name.fmt(f),
            Identity::Ip(ip) => ip.fmt(f),
        }
    }
}

impl PartialEq<&str> for Identity {
    fn eq(&self, other: &&str) -> bool {
        match self {
            Identity::Spiffe(id) => id.as_str() == *other,
            Identity::Dns(name) => name.as_str() == *other,
            Identity::Ip(ip) => other.parse() == Ok(*ip),
        }
    }
}

/// A DNS name (wildcard labels allowed), as a gateway forwards it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DnsName(String);

impl DnsName {
    pub fn parse(input: &str) -> Result<Self, IdentityError> {
        let ok = input.len() <= 253
            && input.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if ok {
            Ok(DnsName(input.to_string()))
        } else {
            Err(IdentityError::DnsName(input.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A trust domain, normalised as Istio does (`@` becomes `.`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn parse(input: &str) -> Result<Self, IdentityError> {
        let td = input.replace('@', ".");
        if td.is_empty() {
            return Err(IdentityError::EmptyTrustDomain);
        }
        if td.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(IdentityError::TrustDomainTooLong(input.to_string()));
        }
        if !td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return Err(IdentityError::TrustDomainCharacter(input.to_string()));
        }
        Ok(Self(td))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

/// A syntactically valid SPIFFE ID (`spiffe://<trust domain>/<path>`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    uri: String,
    td_len: usize,
}

impl SpiffeId {
    pub fn parse(input: &str) -> Result<Self, IdentityError> {
        if input.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdentityError::TooLong);
        }
        let rest = input
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::NotSpiffe(input.to_string()))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| IdentityError::NoPath(input.to_string()))?;
        // The trust domain of an ID must already be normalised: no '@' rewriting here.
        if td.contains('@') {
            return Err(IdentityError::TrustDomainCharacter(td.to_string()));
        }
        TrustDomain::parse(td)?;
        for segment in path.split('/') {
            if segment.is_empty() {
                return Err(IdentityError::EmptySegment(input.to_string()));
            }
            if segment == "." || segment == ".." {
                return Err(IdentityError::DotSegment(input.to_string()));
            }
            if !segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(IdentityError::PathCharacter(input.to_string()));
            }
        }
        Ok(Self {
            uri: input.to_string(),
            td_len: td.len(),
        })
    }

    /// Istio's workload identity `spiffe://<td>/ns/<ns>/sa/<sa>`; `ns` and `sa`
    /// must be valid Kubernetes names so they cannot smuggle path segments.
    pub fn workload(td: &TrustDomain, ns: &str, sa: &str) -> Result<Self, IdentityError> {
        check_k8s_name(ns, "namespace", 63)?;
        check_k8s_name(sa, "service account", 253)?;
        Self::parse(&format!("{SCHEME}{td}/ns/{ns}/sa/{sa}"))
    }

    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..SCHEME.len() + self.td_len]
    }

    pub fn path(&self) -> &str {
        &self.uri[SCHEME.len() + self.td_len..]
    }

    /// `(namespace, service account)` when the path is Istio's `/ns/<ns>/sa/<sa>`.
    pub fn namespace_and_service_account(&self) -> Option<(&str, &str)> {
        let mut it = self.path().strip_prefix('/')?.split('/');
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

/// The trust domains certificates are issued in: `--trust-domain` plus the
/// explicitly configured `--trust-domain-aliases` (istiod's meshConfig
/// `trustDomainAliases`). Every issuance passes [`TrustDomains::check`], so
/// no authenticator (client certificate, JWT, TokenReview, XFCC, lab mode) and
/// no impersonation can put a foreign SPIFFE ID into a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustDomains {
    primary: TrustDomain,
    aliases: Vec<TrustDomain>,
}

/// A caller identity the CA will not issue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustDomainError {
    #[error(
        "identity {identity:?} is in trust domain {trust_domain:?}, not in {allowed} (--trust-domain, --trust-domain-aliases)"
    )]
    Foreign {
        identity: String,
        trust_domain: String,
        allowed: String,
    },
    #[error("identity {identity:?} has a spiffe scheme but is not a valid SPIFFE ID: {reason}")]
    Malformed {
        identity: String,
        reason: IdentityError,
    },
}

impl TrustDomains {
    pub fn new(primary: TrustDomain, aliases: Vec<TrustDomain>) -> Self {
        let mut aliases: Vec<TrustDomain> = aliases.into_iter().filter(|a| *a != primary).collect();
        aliases.dedup();
        TrustDomains { primary, aliases }
    }

    pub fn primary(&self) -> &TrustDomain {
        &self.primary
    }

    pub fn aliases(&self) -> &[TrustDomain] {
        &self.aliases
    }

    pub fn contains(&self, trust_domain: &str) -> bool {
        self.primary.as_str() == trust_domain
            || self.aliases.iter().any(|a| a.as_str() == trust_domain)
    }

    /// Every SPIFFE identity must be in one of our trust domains. The scheme
    /// is matched case-insensitively so `SPIFFE://evil/x` cannot slip through
    /// as something else. IPs and DNS names have no trust domain.
    pub fn check<I: fmt::Display>(&self, identities: &[I]) -> Result<(), TrustDomainError> {
        for identity in identities {
            let identity = identity.to_string();
            let identity = identity.as_str();
            let looks_spiffe = identity
                .get(..SCHEME.len())
                .is_some_and(|s| s.eq_ignore_ascii_case(SCHEME));
            if !looks_spiffe {
                continue;
            }
            let short = || identity.chars().take(256).collect::<String>();
            let id = SpiffeId::parse(identity).map_err(|reason| TrustDomainError::Malformed {
                identity: short(),
                reason,
            })?;
            if !self.contains(id.trust_domain()) {
                return Err(TrustDomainError::Foreign {
                    identity: short(),
                    trust_domain: id.trust_domain().to_string(),
                    allowed: self.to_string(),
                });
            }
        }
        Ok(())
    }
}

impl fmt::Display for TrustDomains {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.primary.as_str())?;
        for a in &self.aliases {
            write!(f, ", {a}")?;
        }
        Ok(())
    }
}

/// RFC 1123 label/subdomain rules as Kubernetes applies them to object names.
fn check_k8s_name(name: &str, kind: &'static str, max: usize) -> Result<(), IdentityError> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
        && (kind != "namespace" || !name.contains('.'));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::KubernetesName(name.to_string(), kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_signs_in_the_trust_domain_become_dots() {
        assert_eq!(TrustDomain::parse("a@b").unwrap().as_str(), "a.b");
    }

    #[test]
    fn bad_trust_domains_are_refused() {
        assert_eq!(TrustDomain::parse(""), Err(IdentityError::EmptyTrustDomain));
        assert!(matches!(
            TrustDomain::parse("Cluster.local"),
            Err(IdentityError::TrustDomainCharacter(_))
        ));
        assert!(matches!(
            TrustDomain::parse("a/b"),
            Err(IdentityError::TrustDomainCharacter(_))
        ));
    }

    #[test]
    fn workload_ids_have_istio_shape() {
        let td = TrustDomain::parse("cluster.local").unwrap();
        let id = SpiffeId::workload(&td, "foo", "httpbin").unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/foo/sa/httpbin");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace_and_service_account(), Some(("foo", "httpbin")));
    }

    #[test]
    fn lenient_spiffe_forms_are_refused() {
        for bad in [
            "spiffe://td/ns//sa/x",
            "spiffe://td/ns/./sa/x",
            "spiffe://td/ns/../sa/x",
            "spiffe://td",
            "spiffe://TD/x",
            "spiffe://td/a b",
            "spiffe://td/x/",
            "http://td/x",
            "spiffe://td/a%2f",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} should be refused");
        }
        assert_eq!(
            SpiffeId::parse(&format!("spiffe://td/{}", "a".repeat(3000))),
            Err(IdentityError::TooLong)
        );
    }

    fn domains() -> TrustDomains {
        TrustDomains::new(
            TrustDomain::parse("cluster.local").unwrap(),
            vec![TrustDomain::parse("old.td").unwrap()],
        )
    }

    #[test]
    fn identities_in_the_trust_domain_or_an_alias_are_issued() {
        let ids = [
            "spiffe://cluster.local/ns/a/sa/b",
            "spiffe://old.td/ns/a/sa/b",
            "a.example.com",
            "10.0.0.1",
        ]
        .map(String::from);
        assert_eq!(domains().check(&ids), Ok(()));
        assert_eq!(domains().to_string(), "cluster.local, old.td");
    }

    #[test]
    fn identities_outside_the_trust_domains_are_refused_by_name() {
        assert_eq!(
            domains().check(&["spiffe://evil.example/ns/default/sa/x"]),
            Err(TrustDomainError::Foreign {
                identity: "spiffe://evil.example/ns/default/sa/x".into(),
                trust_domain: "evil.example".into(),
                allowed: "cluster.local, old.td".into(),
            })
        );
        assert_eq!(
            domains()
                .check(&["spiffe://evil.example/ns/default/sa/x"])
                .unwrap_err()
                .to_string(),
            "identity \"spiffe://evil.example/ns/default/sa/x\" is in trust domain \"evil.example\", not in cluster.local, old.td (--trust-domain, --trust-domain-aliases)"
        );
        // A foreign identity anywhere in the list refuses the whole request.
        assert!(matches!(
            domains().check(&[
                "spiffe://cluster.local/ns/a/sa/b".to_string(),
                "spiffe://cluster.local.evil/ns/a/sa/b".to_string()
            ]),
            Err(TrustDomainError::Foreign { .. })
        ));
        for odd in [
            "SPIFFE://evil/ns/a/sa/b",
            "Spiffe://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local",
        ] {
            assert!(
                matches!(
                    domains().check(&[odd.to_string()]),
                    Err(TrustDomainError::Malformed { .. })
                ),
                "{odd}"
            );
        }
    }

    #[test]
    fn identity_text_maps_to_the_san_kind_istiod_uses() {
        assert!(matches!(
            Identity::parse("spiffe://td/ns/a/sa/b"),
            Ok(Identity::Spiffe(_))
        ));
        assert_eq!(
            Identity::parse("10.0.0.1"),
            Ok(Identity::Ip(IpAddr::from([10, 0, 0, 1])))
        );
        assert!(matches!(
            Identity::parse("*.example.com"),
            Ok(Identity::Dns(_))
        ));
        for bad in ["spiffe://td", "a..b", "-a.b", "a b", "https://x/y", ""] {
            assert!(Identity::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn kubernetes_names_cannot_inject_path_segments() {
        let td = TrustDomain::parse("cluster.local").unwrap();
        for (ns, sa) in [
            ("a/b", "x"),
            ("a", "x/sa/y"),
            ("", "x"),
            ("a", ""),
            ("A", "x"),
            ("a.b", "x"),
        ] {
            assert!(SpiffeId::workload(&td, ns, sa).is_err(), "{ns}/{sa}");
        }
        assert!(SpiffeId::workload(&td, "istio-system", "ztunnel.v1").is_ok());
    }
}
