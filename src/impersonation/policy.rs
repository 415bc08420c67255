//! The impersonation policy file (`--impersonation-policy`), for setups
//! without Kubernetes: which trusted node accounts may impersonate which
//! workload identities. Nothing that is not listed is allowed.
//!
//! Format: a JSON array of rules. `caller` is an exact `namespace/service-account`
//! (it must also be in `--trusted-node-accounts`); each `may_impersonate`
//! pattern is `namespace/service-account` where either side may be `*`:
//!
//! ```json
//! [
//!   {"caller": "istio-system/ztunnel", "may_impersonate": ["ns-a/*", "ns-b/sa-b", "*/default"]}
//! ]
//! ```
//!
//! Several rules for the same caller add up. Unknown keys are refused so a
//! typo cannot silently widen or narrow the policy.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::impersonation::NodeAccount;

/// Largest policy file read.
pub const MAX_POLICY_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("{file}: cannot read: {reason}")]
    Read { file: PathBuf, reason: String },
    #[error("{file}: larger than {MAX_POLICY_BYTES} bytes")]
    TooLarge { file: PathBuf },
    #[error(
        "{file}: not an impersonation policy (a JSON array of {{\"caller\": \"ns/sa\", \"may_impersonate\": [\"ns/sa\", \"ns/*\", \"*/sa\"]}}): {reason}"
    )]
    Parse { file: PathBuf, reason: String },
    #[error("{file}: rule {rule}: caller {caller:?}: {reason}")]
    Caller {
        file: PathBuf,
        rule: usize,
        caller: String,
        reason: String,
    },
    #[error("{file}: rule {rule}: pattern {pattern:?}: {reason}")]
    Pattern {
        file: PathBuf,
        rule: usize,
        pattern: String,
        reason: String,
    },
    #[error(
        "{file}: rule {rule}: caller {caller} is not in --trusted-node-accounts ({trusted}); add it there or remove the rule"
    )]
    UntrustedCaller {
        file: PathBuf,
        rule: usize,
        caller: NodeAccount,
        trusted: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    caller: String,
    may_impersonate: Vec<String>,
}

/// One side of a pattern: a name or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Any,
    Exact(String),
}

impl Part {
    fn matches(&self, name: &str) -> bool {
        match self {
            Part::Any => true,
            Part::Exact(n) => n == name,
        }
    }
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Part::Any => f.write_str("*"),
            Part::Exact(n) => f.write_str(n),
        }
    }
}

/// `namespace/service-account` with `*` allowed on either side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    namespace: Part,
    service_account: Part,
}

impl Pattern {
    pub fn parse(input: &str) -> Result<Self, String> {
        let (ns, sa) = input
            .split_once('/')
            .ok_or_else(|| "not namespace/service-account".to_string())?;
        let part = |s: &str, kind: &str| -> Result<Part, String> {
            if s == "*" {
                return Ok(Part::Any);
            }
            NodeAccount::check_name(s, kind)?;
            Ok(Part::Exact(s.to_string()))
        };
        Ok(Pattern {
            namespace: part(ns, "namespace")?,
            service_account: part(sa, "service account")?,
        })
    }

    pub fn matches(&self, namespace: &str, service_account: &str) -> bool {
        self.namespace.matches(namespace) && self.service_account.matches(service_account)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

/// A loaded, validated policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<(NodeAccount, Vec<Pattern>)>,
}

impl Policy {
    /// Reads and validates `path`; every caller must be one of `trusted`.
    pub fn load(path: &Path, trusted: &[NodeAccount]) -> Result<Self, PolicyError> {
        use std::io::Read as _;
        let file = path.to_path_buf();
        let read_err = |e: std::io::Error| PolicyError::Read {
            file: file.clone(),
            reason: e.to_string(),
        };
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .map_err(read_err)?
            .take(MAX_POLICY_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_POLICY_BYTES {
            return Err(PolicyError::TooLarge { file });
        }
        Self::parse(&bytes, path, trusted)
    }

    /// Parses policy JSON; `file` only names the source in errors.
    pub fn parse(bytes: &[u8], file: &Path, trusted: &[NodeAccount]) -> Result<Self, PolicyError> {
        let file = file.to_path_buf();
        let raw: Vec<RawRule> = serde_json::from_slice(bytes).map_err(|e| PolicyError::Parse {
            file: file.clone(),
            reason: e.to_string(),
        })?;
        let mut rules: Vec<(NodeAccount, Vec<Pattern>)> = Vec::new();
        for (i, r) in raw.into_iter().enumerate() {
            let rule = i + 1;
            let caller: NodeAccount = r.caller.parse().map_err(|reason| PolicyError::Caller {
                file: file.clone(),
                rule,
                caller: r.caller.clone(),
                reason,
            })?;
            if !trusted.contains(&caller) {
                return Err(PolicyError::UntrustedCaller {
                    file,
                    rule,
                    caller,
                    trusted: join(trusted),
                });
            }
            let patterns = r
                .may_impersonate
                .iter()
                .map(|p| {
                    Pattern::parse(p).map_err(|reason| PolicyError::Pattern {
                        file: file.clone(),
                        rule,
                        pattern: p.clone(),
                        reason,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            match rules.iter_mut().find(|(c, _)| *c == caller) {
                Some((_, existing)) => existing.extend(patterns),
                None => rules.push((caller, patterns)),
            }
        }
        Ok(Policy { rules })
    }

    /// The patterns `caller` may impersonate (empty when it has no rule).
    pub fn allowed_for(&self, caller: &NodeAccount) -> &[Pattern] {
        self.rules
            .iter()
            .find(|(c, _)| c == caller)
            .map_or(&[], |(_, p)| p.as_slice())
    }

    /// Whether `caller` may impersonate `namespace/service_account`.
    pub fn allows(&self, caller: &NodeAccount, namespace: &str, service_account: &str) -> bool {
        self.allowed_for(caller)
            .iter()
            .any(|p| p.matches(namespace, service_account))
    }
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

    fn ztunnel() -> NodeAccount {
        "istio-system/ztunnel".parse().unwrap()
    }

    fn parse(json: &str) -> Result<Policy, PolicyError> {
        Policy::parse(json.as_bytes(), Path::new("p.json"), &[ztunnel()])
    }

    #[test]
    fn patterns_match_exact_names_and_wildcards() {
        let p = parse(
            r#"[{"caller":"istio-system/ztunnel","may_impersonate":["ns-a/*","ns-b/sa-b","*/default"]}]"#,
        )
        .unwrap();
        let z = ztunnel();
        assert!(p.allows(&z, "ns-a", "anything"));
        assert!(p.allows(&z, "ns-b", "sa-b"));
        assert!(!p.allows(&z, "ns-b", "sa-c"));
        assert!(p.allows(&z, "ns-c", "default"));
        assert!(!p.allows(&z, "ns-c", "other"));
        let other: NodeAccount = "kube-system/other".parse().unwrap();
        assert!(!p.allows(&other, "ns-a", "x"), "no rule means nothing");
    }

    #[test]
    fn rules_for_the_same_caller_add_up() {
        let p = parse(
            r#"[{"caller":"istio-system/ztunnel","may_impersonate":["a/x"]},
                {"caller":"istio-system/ztunnel","may_impersonate":["b/y"]}]"#,
        )
        .unwrap();
        assert!(p.allows(&ztunnel(), "a", "x") && p.allows(&ztunnel(), "b", "y"));
        assert_eq!(
            p.allowed_for(&ztunnel())
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["a/x", "b/y"]
        );
    }

    #[test]
    fn an_empty_policy_allows_nothing() {
        assert!(!parse("[]").unwrap().allows(&ztunnel(), "a", "b"));
    }

    #[test]
    fn a_caller_outside_the_trusted_node_accounts_is_refused_at_load() {
        let e = parse(r#"[{"caller":"default/sleep","may_impersonate":["a/*"]}]"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "p.json: rule 1: caller default/sleep is not in --trusted-node-accounts (istio-system/ztunnel); add it there or remove the rule"
        );
    }

    #[test]
    fn malformed_policies_name_the_rule_and_the_bad_value() {
        for (json, expect) in [
            (
                r#"[{"caller":"ztunnel","may_impersonate":[]}]"#,
                "p.json: rule 1: caller \"ztunnel\": not namespace/service-account",
            ),
            (
                r#"[{"caller":"istio-system/*","may_impersonate":[]}]"#,
                "p.json: rule 1: caller \"istio-system/*\": \"*\" is not a valid Kubernetes service account name",
            ),
            (
                r#"[{"caller":"istio-system/ztunnel","may_impersonate":["a"]}]"#,
                "p.json: rule 1: pattern \"a\": not namespace/service-account",
            ),
            (
                r#"[{"caller":"istio-system/ztunnel","may_impersonate":["a/b/c"]}]"#,
                "p.json: rule 1: pattern \"a/b/c\": \"b/c\" is not a valid Kubernetes service account name",
            ),
            (
                r#"[{"caller":"istio-system/ztunnel","may_impersonate":["ns-*/x"]}]"#,
                "p.json: rule 1: pattern \"ns-*/x\": \"ns-*\" is not a valid Kubernetes namespace name",
            ),
        ] {
            assert_eq!(parse(json).unwrap_err().to_string(), expect, "{json}");
        }
        for json in [
            r#"{"caller":"istio-system/ztunnel"}"#,
            r#"[{"caller":"istio-system/ztunnel","may_impersonate":["a/*"],"may_impersonat":[]}]"#,
            r#"[{"caller":"istio-system/ztunnel"}]"#,
        ] {
            assert!(
                matches!(parse(json), Err(PolicyError::Parse { .. })),
                "{json}"
            );
        }
    }
}
