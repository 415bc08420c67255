//! The controllers' flags of `plugca serve` (flattened into
//! [`crate::config::ServeArgs`]) and their one pure step to a [`ControllersConfig`].

use std::collections::BTreeSet;

use clap::Args;

use crate::config::ConfigError;
use crate::controllers::istiod_tls::IstiodTlsConfig;
use crate::controllers::leader::{self, LeaderConfig};
use crate::controllers::root_configmap::RootConfigMapConfig;
use crate::controllers::selector::LabelSelector;
use crate::controllers::{ControllersConfig, DEFAULT_LEASE_NAME, DEFAULT_NAMESPACE};
use crate::identity::TrustDomain;

#[derive(Debug, Clone, Args)]
pub struct ControllersArgs {
    /// Keep ConfigMap istio-ca-root-cert (key root-cert.pem: the roots plus
    /// --extra-trust-roots) in every namespace, as istiod does when it is the
    /// CA. Needs Kubernetes API access; with several replicas the Lease holder writes.
    #[arg(long, env = "PLUGCA_ROOT_CONFIGMAP")]
    pub root_configmap: bool,

    /// Only namespaces whose labels match this selector get the ConfigMap
    /// (kubectl syntax, e.g. istio-injection=enabled or 'env in (prod,stage)').
    #[arg(long, env = "PLUGCA_ROOT_CONFIGMAP_NAMESPACE_SELECTOR")]
    pub root_configmap_namespace_selector: Option<String>,

    /// Namespaces never given the ConfigMap, comma-separated. Default none:
    /// ztunnel or a gateway may run in kube-system (GKE puts ztunnel there),
    /// a missing ConfigMap hangs pods in ContainerCreating, and the ConfigMap
    /// only holds public certificates.
    #[arg(
        long,
        env = "PLUGCA_ROOT_CONFIGMAP_EXCLUDE_NAMESPACES",
        value_delimiter = ','
    )]
    pub root_configmap_exclude_namespaces: Vec<String>,

    /// Issue and renew istiod's serving certificate as Secret istiod-tls
    /// (kubernetes.io/tls) in --istiod-namespace. Needs Kubernetes API access.
    #[arg(long, env = "PLUGCA_ISTIOD_TLS_SECRET")]
    pub istiod_tls_secret: bool,

    /// istiod's namespace [default: POD_NAMESPACE, else istio-system].
    #[arg(long, env = "PLUGCA_ISTIOD_NAMESPACE")]
    pub istiod_namespace: Option<String>,

    /// istiod revisions, comma-separated: each adds DNS istiod-<rev>.<ns>.svc.
    #[arg(long, env = "PLUGCA_ISTIOD_REVISIONS", value_delimiter = ',')]
    pub istiod_revisions: Vec<String>,

    /// Extra DNS names for istiod's certificate, comma-separated.
    #[arg(long, env = "PLUGCA_ISTIOD_EXTRA_DNS_NAMES", value_delimiter = ',')]
    pub istiod_extra_dns_names: Vec<String>,

    /// Namespace of the leader-election Lease [default: POD_NAMESPACE, else istio-system].
    #[arg(long, env = "PLUGCA_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,

    /// Name of the leader-election Lease.
    #[arg(long, env = "PLUGCA_LEADER_ELECTION_LEASE", default_value = DEFAULT_LEASE_NAME)]
    pub leader_election_lease: String,

    /// How many replicas run (the chart passes its replicaCount). With more
    /// than one, plugca refuses to start on a self-signed root (every replica
    /// would make its own) unless it is kept in --self-signed-secret.
    #[arg(long, env = "PLUGCA_REPLICAS", default_value_t = 1)]
    pub replicas: u32,

    /// Set from the downward API in the chart: the pod's namespace.
    #[arg(long, env = "POD_NAMESPACE", hide = true)]
    pub pod_namespace: Option<String>,

    /// Set from the downward API in the chart: the Lease holder identity.
    #[arg(long, env = "POD_NAME", hide = true)]
    pub pod_name: Option<String>,
}

impl ControllersArgs {
    pub fn into_config(self, trust_domain: &TrustDomain) -> Result<ControllersConfig, ConfigError> {
        let pod_namespace = self
            .pod_namespace
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .unwrap_or(DEFAULT_NAMESPACE)
            .to_string();
        let namespace = |flag, env, v: Option<String>| -> Result<String, ConfigError> {
            match v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty()) {
                None => Ok(pod_namespace.clone()),
                Some(ns) if is_dns_label(&ns) => Ok(ns),
                Some(ns) => Err(invalid(
                    flag,
                    env,
                    &ns,
                    "not a namespace name (a DNS label)",
                )),
            }
        };
        let root_configmap = if self.root_configmap {
            let namespace_selector = match self
                .root_configmap_namespace_selector
                .as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
            {
                None => None,
                Some(s) => Some(LabelSelector::parse(s).map_err(|e| {
                    invalid(
                        "--root-configmap-namespace-selector",
                        "PLUGCA_ROOT_CONFIGMAP_NAMESPACE_SELECTOR",
                        s,
                        &e.to_string(),
                    )
                })?),
            };
            let exclude_namespaces = names(
                &self.root_configmap_exclude_namespaces,
                "--root-configmap-exclude-namespaces",
                "PLUGCA_ROOT_CONFIGMAP_EXCLUDE_NAMESPACES",
            )?;
            Some(RootConfigMapConfig {
                namespace_selector,
                exclude_namespaces,
            })
        } else {
            None
        };
        let istiod_tls = if self.istiod_tls_secret {
            let revisions = names(
                &self.istiod_revisions,
                "--istiod-revisions",
                "PLUGCA_ISTIOD_REVISIONS",
            )?;
            let extra_dns_names = self
                .istiod_extra_dns_names
                .iter()
                .map(|n| n.trim())
                .filter(|n| !n.is_empty())
                .map(|n| {
                    if n.split('.').all(|l| is_dns_label(l) || l == "*") {
                        Ok(n.to_string())
                    } else {
                        Err(invalid(
                            "--istiod-extra-dns-names",
                            "PLUGCA_ISTIOD_EXTRA_DNS_NAMES",
                            n,
                            "not a DNS name",
                        ))
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some(IstiodTlsConfig {
                namespace: namespace(
                    "--istiod-namespace",
                    "PLUGCA_ISTIOD_NAMESPACE",
                    self.istiod_namespace,
                )?,
                revisions: revisions.into_iter().collect(),
                extra_dns_names,
                trust_domain: trust_domain.clone(),
            })
        } else {
            None
        };
        let lease_name = self.leader_election_lease.trim().to_string();
        if !lease_name.split('.').all(is_dns_label) {
            return Err(invalid(
                "--leader-election-lease",
                "PLUGCA_LEADER_ELECTION_LEASE",
                &lease_name,
                "not an object name (a DNS subdomain)",
            ));
        }
        Ok(ControllersConfig {
            root_configmap,
            istiod_tls,
            leader: LeaderConfig {
                namespace: namespace(
                    "--leader-election-namespace",
                    "PLUGCA_LEADER_ELECTION_NAMESPACE",
                    self.leader_election_namespace,
                )?,
                lease_name,
                identity: leader::identity(self.pod_name.as_deref()),
            },
            replicas: self.replicas,
        })
    }
}

fn invalid(flag: &'static str, env: &'static str, value: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        flag,
        env,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// Namespace or revision names: DNS labels.
fn names(
    values: &[String],
    flag: &'static str,
    env: &'static str,
) -> Result<BTreeSet<String>, ConfigError> {
    values
        .iter()
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
        .map(|v| {
            if is_dns_label(v) {
                Ok(v.to_string())
            } else {
                Err(invalid(
                    flag,
                    env,
                    v,
                    "not a DNS label (lower-case letters, digits, '-')",
                ))
            }
        })
        .collect()
}

/// RFC 1123 label, as Kubernetes requires of namespace names.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        c: ControllersArgs,
    }

    fn parse(args: &[&str]) -> Result<ControllersConfig, ConfigError> {
        let mut all = vec!["plugca"];
        all.extend_from_slice(args);
        T::try_parse_from(all)
            .unwrap()
            .c
            .into_config(&TrustDomain::parse("cluster.local").unwrap())
    }

    #[test]
    fn everything_is_off_by_default_and_namespaces_default_to_istio_system() {
        let c = parse(&[]).unwrap();
        assert!(!c.any_enabled());
        assert_eq!(c.leader.namespace, "istio-system");
        assert_eq!(c.leader.lease_name, "plugca-leader");
    }

    #[test]
    fn the_pod_namespace_is_the_default_for_istiod_and_the_lease() {
        let c = parse(&[
            "--istiod-tls-secret",
            "--pod-namespace",
            "mesh",
            "--pod-name",
            "plugca-0",
        ])
        .unwrap();
        assert_eq!(c.istiod_tls.unwrap().namespace, "mesh");
        assert_eq!(c.leader.namespace, "mesh");
        assert_eq!(c.leader.identity, "plugca-0");
        let c = parse(&[
            "--istiod-tls-secret",
            "--istiod-namespace",
            "istiod-ns",
            "--leader-election-namespace",
            "leases",
            "--pod-namespace",
            "mesh",
        ])
        .unwrap();
        assert_eq!(c.istiod_tls.unwrap().namespace, "istiod-ns");
        assert_eq!(c.leader.namespace, "leases");
    }

    #[test]
    fn lists_are_comma_separated_and_trimmed() {
        let c = parse(&[
            "--root-configmap",
            "--root-configmap-exclude-namespaces",
            "legacy, batch",
            "--root-configmap-namespace-selector",
            "istio-injection=enabled",
            "--istiod-tls-secret",
            "--istiod-revisions",
            "canary,stable",
            "--istiod-extra-dns-names",
            "istiod.example.com",
        ])
        .unwrap();
        let rc = c.root_configmap.unwrap();
        assert_eq!(
            rc.exclude_namespaces.into_iter().collect::<Vec<_>>(),
            ["batch", "legacy"]
        );
        assert_eq!(
            rc.namespace_selector.unwrap().as_str(),
            "istio-injection=enabled"
        );
        let it = c.istiod_tls.unwrap();
        assert_eq!(it.revisions, ["canary", "stable"]);
        assert_eq!(it.extra_dns_names, ["istiod.example.com"]);
    }

    #[test]
    fn bad_values_name_the_flag_and_env() {
        let table: &[(&[&str], &str)] = &[
            (
                &[
                    "--root-configmap",
                    "--root-configmap-namespace-selector",
                    "a in (b",
                ],
                "--root-configmap-namespace-selector (env PLUGCA_ROOT_CONFIGMAP_NAMESPACE_SELECTOR): \"a in (b\": \"a in (b\": unbalanced parentheses",
            ),
            (
                &[
                    "--root-configmap",
                    "--root-configmap-exclude-namespaces",
                    "Kube_System",
                ],
                "--root-configmap-exclude-namespaces (env PLUGCA_ROOT_CONFIGMAP_EXCLUDE_NAMESPACES): \"Kube_System\": not a DNS label (lower-case letters, digits, '-')",
            ),
            (
                &["--istiod-tls-secret", "--istiod-namespace", "a/b"],
                "--istiod-namespace (env PLUGCA_ISTIOD_NAMESPACE): \"a/b\": not a namespace name (a DNS label)",
            ),
            (
                &[
                    "--istiod-tls-secret",
                    "--istiod-extra-dns-names",
                    "bad name",
                ],
                "--istiod-extra-dns-names (env PLUGCA_ISTIOD_EXTRA_DNS_NAMES): \"bad name\": not a DNS name",
            ),
            (
                &["--leader-election-lease", "Bad"],
                "--leader-election-lease (env PLUGCA_LEADER_ELECTION_LEASE): \"Bad\": not an object name (a DNS subdomain)",
            ),
        ];
        for (args, want) in table {
            assert_eq!(parse(args).unwrap_err().to_string(), *want, "{args:?}");
        }
    }
}
