//! `plugca serve` flags and environment, turned into a typed [`Config`] in one
//! pure step. Config holds paths, never secrets, so it is safe to log.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::authn::jwks::JwtRule;
use crate::authn::xfcc::Cidr;
use crate::ca::generate::KeyChoice;
use crate::duration;
use crate::fault::Fault;
use crate::identity::TrustDomain;
use crate::impersonation::NodeAccount;
use crate::kubernetes::{KubeSource, KubernetesConfig};

pub const DEFAULT_CACERTS_DIR: &str = "/etc/cacerts";
pub const DEFAULT_GRPC_ADDR: &str = "0.0.0.0:15012";
pub const DEFAULT_MONITORING_ADDR: &str = "0.0.0.0:15014";
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_WORKLOAD_CERT_TTL: &str = "24h";
pub const MAX_WORKLOAD_CERT_TTL: &str = "2160h";
pub const DEFAULT_JWT_AUDIENCE: &str = "istio-ca";
pub const DEFAULT_SIGN_QUEUE_TIMEOUT: &str = "2s";
pub const DEFAULT_SELF_SIGNED_TTL: &str = "87600h";
pub const DEFAULT_EXPIRY_WARNING: &str = "720h";
pub const DEFAULT_RELOAD_INTERVAL: &str = "60s";
pub const DEFAULT_DRAIN_TIMEOUT: &str = "30s";
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
pub const DEFAULT_TOKEN_AUDIENCES: &str = "istio-ca";
pub const DEFAULT_KUBE_API_TIMEOUT: &str = "5s";
pub const DEFAULT_TOKEN_REVIEW_CACHE_TTL: &str = "60s";

/// Flags of `plugca serve`. Each can also be set from the environment variable shown.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Directory with the plugged-in CA: ca-cert.pem, ca-key.pem, cert-chain.pem,
    /// root-cert.pem (or tls.crt, tls.key, ca.crt). Without any of them a
    /// self-signed root is generated in memory.
    #[arg(long, env = "ROOT_CA_DIR", default_value = DEFAULT_CACERTS_DIR)]
    pub cacerts_dir: PathBuf,

    /// Address of the gRPC (TLS) listener.
    #[arg(long, env = "PLUGCA_GRPC_ADDR", default_value = DEFAULT_GRPC_ADDR)]
    pub grpc_addr: String,

    /// Address of the HTTP monitoring listener (/ready, /healthz, /metrics).
    #[arg(long, env = "PLUGCA_MONITORING_ADDR", default_value = DEFAULT_MONITORING_ADDR)]
    pub monitoring_addr: String,

    /// Trust domain of issued SPIFFE identities ('@' is turned into '.').
    #[arg(long, env = "TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Lifetime of a certificate when the request asks for none (Go duration: 90m, 24h, 1h30m).
    #[arg(long, env = "DEFAULT_WORKLOAD_CERT_TTL", default_value = DEFAULT_WORKLOAD_CERT_TTL)]
    pub default_ttl: String,

    /// Longest lifetime a request may ask for; longer requests are refused.
    #[arg(long, env = "MAX_WORKLOAD_CERT_TTL", default_value = MAX_WORKLOAD_CERT_TTL)]
    pub max_ttl: String,

    /// Issuer (`iss`) of bearer JWTs to accept; needs --jwks-file.
    #[arg(long, env = "PLUGCA_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// JWKS file with the keys that sign bearer JWTs (RS256, ES256); needs --jwt-issuer.
    #[arg(long, env = "PLUGCA_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,

    /// Accepted JWT audience; repeat the flag (or comma-separate in the env) for several.
    #[arg(long, env = "PLUGCA_JWT_AUDIENCE", value_delimiter = ',', default_value = DEFAULT_JWT_AUDIENCE)]
    pub jwt_audience: Vec<String>,

    /// istiod's JWT_RULE: accept bearer JWTs of an OIDC issuer whose keys are
    /// fetched over HTTPS, as JSON {"issuer": "https://...", "jwks_uri":
    /// "https://...", "audiences": ["..."]}; without jwks_uri the issuer's
    /// /.well-known/openid-configuration names it.
    #[arg(long, env = "JWT_RULE")]
    pub jwt_rule: Option<String>,

    /// PEM roots to trust for the --jwt-rule endpoints besides the system roots.
    #[arg(long, env = "PLUGCA_JWT_RULE_CA_FILE")]
    pub jwt_rule_ca_file: Option<PathBuf>,

    /// Extra DNS names for the gRPC serving certificate, comma-separated.
    #[arg(long, env = "ISTIOD_CUSTOM_HOST", value_delimiter = ',')]
    pub server_dns_names: Vec<String>,

    /// LAB ONLY: when no other authenticator accepts a request, issue for the
    /// single SPIFFE URI SAN of the CSR (in our trust domain) without any proof.
    #[arg(long, env = "PLUGCA_INSECURE_TRUST_CSR_IDENTITY")]
    pub insecure_trust_csr_identity: bool,

    /// Signings in progress at once [default: number of CPUs].
    #[arg(long, env = "PLUGCA_MAX_CONCURRENT_SIGNS")]
    pub max_concurrent_signs: Option<usize>,

    /// How long a request waits for a signing slot before RESOURCE_EXHAUSTED.
    #[arg(long, env = "PLUGCA_SIGN_QUEUE_TIMEOUT", default_value = DEFAULT_SIGN_QUEUE_TIMEOUT)]
    pub sign_queue_timeout: String,

    /// Lifetime of the generated self-signed root (when no bundle is plugged in).
    #[arg(long, env = "CITADEL_SELF_SIGNED_CA_CERT_TTL", default_value = DEFAULT_SELF_SIGNED_TTL)]
    pub self_signed_ttl: String,

    /// Key type of the generated self-signed root.
    #[arg(long, env = "PLUGCA_SELF_SIGNED_KEY", value_enum, default_value_t = KeyChoice::P256)]
    pub self_signed_key: KeyChoice,

    /// Directory to keep the self-signed root and key in (key mode 0600), so a
    /// restart keeps the same root. Must not be the cacerts directory.
    #[arg(long, env = "PLUGCA_SELF_SIGNED_DIR")]
    pub self_signed_dir: Option<PathBuf>,

    /// Accept a reloaded root-cert.pem that shares no root with the current one.
    /// Without it only adding or removing roots is accepted (safe rotation).
    #[arg(long, env = "PLUGCA_ALLOW_ROOT_REPLACEMENT")]
    pub allow_root_replacement: bool,

    /// PEM file of extra roots (an old root, a peer cluster's root) appended to
    /// the root bundle sent to workloads.
    #[arg(long, env = "PLUGCA_EXTRA_TRUST_ROOTS")]
    pub extra_trust_roots: Option<PathBuf>,

    /// Warn (log and metric) when the signing cert or a root expires within this.
    #[arg(long, env = "PLUGCA_EXPIRY_WARNING", default_value = DEFAULT_EXPIRY_WARNING)]
    pub expiry_warning: String,

    /// Re-check the cacerts directory this often even without file events.
    #[arg(long, env = "PLUGCA_RELOAD_INTERVAL", default_value = DEFAULT_RELOAD_INTERVAL)]
    pub reload_interval: String,

    /// On SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, env = "PLUGCA_DRAIN_TIMEOUT", default_value = DEFAULT_DRAIN_TIMEOUT)]
    pub drain_timeout: String,

    /// TEST HARNESSES ONLY: enable fault injection and the admin endpoints on the
    /// monitoring port (`PUT/POST/DELETE /faults`, `GET /issued`).
    #[arg(long, env = "PLUGCA_ENABLE_FAULT_INJECTION")]
    pub enable_fault_injection: bool,

    /// A fault applied to every request (implies --enable-fault-injection); repeatable.
    /// One of refuse:<grpc code>[:message], empty-chain, leaf-only, latency:<duration>,
    /// expired, not-yet-valid, ttl:<duration>, wrong-key.
    #[arg(long = "fault", env = "PLUGCA_FAULTS", value_delimiter = ',')]
    pub faults: Vec<String>,

    /// Kubeconfig of the local cluster, for TokenReview authentication and node
    /// authorization. Without it, the pod's service account is used when
    /// running in Kubernetes (KUBERNETES_SERVICE_HOST is set).
    #[arg(long, env = "PLUGCA_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Do not use Kubernetes, even when running in a pod.
    #[arg(long, env = "PLUGCA_NO_KUBERNETES", conflicts_with = "kubeconfig")]
    pub no_kubernetes: bool,

    /// Set by Kubernetes in every pod: selects the in-cluster configuration.
    #[arg(long, env = "KUBERNETES_SERVICE_HOST", hide = true)]
    pub kubernetes_service_host: Option<String>,

    /// Id of the local cluster; a request whose clusterid header is missing,
    /// empty or equal to it is checked against the local API server.
    #[arg(long, env = "CLUSTER_ID", default_value = DEFAULT_CLUSTER_ID)]
    pub cluster_id: String,

    /// Directory of kubeconfig files, one per remote cluster; the file name is
    /// the cluster id that requests name in their clusterid header.
    #[arg(long, env = "PLUGCA_REMOTE_KUBECONFIGS")]
    pub remote_kubeconfigs: Option<PathBuf>,

    /// Audiences put in TokenReviews (comma-separated): tokens must be issued for one.
    #[arg(long, env = "TOKEN_AUDIENCES", value_delimiter = ',', default_value = DEFAULT_TOKEN_AUDIENCES)]
    pub token_audiences: Vec<String>,

    /// Longest wait for the Kubernetes API server per TokenReview; past it the
    /// request fails with UNAVAILABLE (clients retry).
    #[arg(long, env = "PLUGCA_KUBE_API_TIMEOUT", default_value = DEFAULT_KUBE_API_TIMEOUT)]
    pub kube_api_timeout: String,

    /// CIDRs of gateways (comma-separated) whose x-forwarded-client-cert header
    /// is trusted for the caller's identities; loopback peers are always
    /// trusted once this is set. Empty: XFCC is ignored.
    #[arg(long, env = "TRUSTED_GATEWAY_CIDR", value_delimiter = ',')]
    pub trusted_gateway_cidrs: Vec<String>,

    /// Service accounts (namespace/name, comma-separated) that may ask for other
    /// identities' certificates with ImpersonatedIdentity (ztunnel in shared
    /// mode), e.g. istio-system/ztunnel. Targets are then checked by Kubernetes
    /// node authorization and/or --impersonation-policy.
    #[arg(long, env = "CA_TRUSTED_NODE_ACCOUNTS", value_delimiter = ',')]
    pub trusted_node_accounts: Vec<String>,

    /// JSON file listing which trusted node accounts may impersonate which
    /// identities, for setups without Kubernetes: [{"caller": "istio-system/ztunnel",
    /// "may_impersonate": ["ns-a/*", "ns-b/sa-b", "*/default"]}]. Nothing else is allowed.
    #[arg(long, env = "PLUGCA_IMPERSONATION_POLICY")]
    pub impersonation_policy: Option<PathBuf>,

    /// Log format.
    #[arg(long, env = "PLUGCA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    // Authentication and reload hardening (issue #12 items 5-8, 10; #9 item 5).
    /// Other trust domains (comma-separated) the CA may issue SPIFFE identities
    /// in besides --trust-domain, like istiod's meshConfig trustDomainAliases.
    /// Identities in any other trust domain are refused, whoever asks.
    #[arg(long, env = "PLUGCA_TRUST_DOMAIN_ALIASES", value_delimiter = ',')]
    pub trust_domain_aliases: Vec<String>,

    /// Allow kubeconfigs in --remote-kubeconfigs to run credential plugins
    /// (users[].user.exec, auth-provider). Off: such a file stops the server at
    /// start (istiod refuses them in remote secrets too), because the command
    /// would run with plugca's privileges.
    #[arg(long, env = "PLUGCA_ALLOW_REMOTE_KUBECONFIG_EXEC")]
    pub allow_remote_kubeconfig_exec: bool,

    /// Longest time a positive TokenReview is remembered (never past the
    /// token's exp), so a revoked token (deleted pod) stops working by then.
    /// 0s: review every request.
    #[arg(long, env = "PLUGCA_TOKEN_REVIEW_CACHE_TTL", default_value = DEFAULT_TOKEN_REVIEW_CACHE_TTL)]
    pub token_review_cache_ttl: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Bearer JWT settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfig {
    pub issuer: String,
    pub jwks_file: PathBuf,
    pub audiences: Vec<String>,
}

/// `--jwt-rule` and where to find roots for its HTTPS endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtRuleConfig {
    pub rule: JwtRule,
    pub ca_file: Option<PathBuf>,
}

/// Who may impersonate, and what checks the targets. With Kubernetes access,
/// node authorization always applies; the policy file, if any, narrows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImpersonationConfig {
    pub trusted_node_accounts: Vec<NodeAccount>,
    pub policy_file: Option<PathBuf>,
}

/// Validated server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub cacerts_dir: PathBuf,
    pub grpc_addr: SocketAddr,
    pub monitoring_addr: SocketAddr,
    pub trust_domain: TrustDomain,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub jwt: Option<JwtConfig>,
    pub jwt_rule: Option<JwtRuleConfig>,
    pub server_dns_names: Vec<String>,
    pub insecure_trust_csr_identity: bool,
    pub impersonation: ImpersonationConfig,
    /// `Some` when Kubernetes authentication (and node authorization) is on.
    pub kubernetes: Option<KubernetesConfig>,
    /// `Some` (non-empty) when the XFCC authenticator is on.
    pub trusted_gateway_cidrs: Option<Vec<Cidr>>,
    pub max_concurrent_signs: usize,
    pub sign_queue_timeout: Duration,
    pub self_signed_ttl: Duration,
    pub self_signed_key: KeyChoice,
    pub self_signed_dir: Option<PathBuf>,
    pub allow_root_replacement: bool,
    pub extra_trust_roots: Option<PathBuf>,
    pub expiry_warning: Duration,
    pub reload_interval: Duration,
    pub drain_timeout: Duration,
    /// `Some` (possibly empty) when fault injection is enabled.
    pub faults: Option<Vec<Fault>>,
    pub log_format: LogFormat,
    /// `--trust-domain-aliases`: where else SPIFFE identities may be issued.
    pub trust_domain_aliases: Vec<TrustDomain>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{flag} (env {env}): {value:?}: {reason}")]
    Invalid {
        flag: &'static str,
        env: &'static str,
        value: String,
        reason: String,
    },
    #[error("--jwt-issuer and --jwks-file must be given together")]
    JwtIncomplete,
    #[error(
        "--impersonation-policy needs --trusted-node-accounts (env CA_TRUSTED_NODE_ACCOUNTS): the policy only narrows what trusted callers may do"
    )]
    PolicyWithoutTrustedAccounts,
    #[error(
        "--trusted-node-accounts is set but nothing can check impersonation targets: give --impersonation-policy (labs) or Kubernetes access (--kubeconfig or in-cluster) for node authorization"
    )]
    NoImpersonationAuthorizer,
    #[error(
        "--remote-kubeconfigs needs access to the local cluster too (--kubeconfig, or running in a pod)"
    )]
    RemoteWithoutLocal,
    #[error(
        "--self-signed-dir must not be the --cacerts-dir ({0}): its files would look like a partial plugged-in bundle"
    )]
    SelfSignedDirIsCacertsDir(PathBuf),
}

impl ServeArgs {
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let invalid = |flag: &'static str, env: &'static str, value: &str, reason: String| {
            ConfigError::Invalid {
                flag,
                env,
                value: value.to_string(),
                reason,
            }
        };
        let addr = |flag, env, v: &str| {
            v.parse::<SocketAddr>().map_err(|e| {
                invalid(
                    flag,
                    env,
                    v,
                    format!("not an address like 0.0.0.0:15012: {e}"),
                )
            })
        };
        let dur = |flag, env, v: &str| {
            duration::parse(v).map_err(|e| invalid(flag, env, v, e.to_string()))
        };
        let trust_domain = TrustDomain::parse(&self.trust_domain).map_err(|e| {
            invalid(
                "--trust-domain",
                "TRUST_DOMAIN",
                &self.trust_domain,
                e.to_string(),
            )
        })?;
        let default_ttl = dur(
            "--default-ttl",
            "DEFAULT_WORKLOAD_CERT_TTL",
            &self.default_ttl,
        )?;
        let max_ttl = dur("--max-ttl", "MAX_WORKLOAD_CERT_TTL", &self.max_ttl)?;
        if default_ttl.is_zero() {
            return Err(invalid(
                "--default-ttl",
                "DEFAULT_WORKLOAD_CERT_TTL",
                &self.default_ttl,
                "must be positive".into(),
            ));
        }
        if max_ttl.is_zero() {
            return Err(invalid(
                "--max-ttl",
                "MAX_WORKLOAD_CERT_TTL",
                &self.max_ttl,
                "must be positive".into(),
            ));
        }
        let kubernetes = self.kubernetes_config()?;
        let jwt_rule = match self.jwt_rule.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(json) => Some(JwtRuleConfig {
                rule: JwtRule::parse(json)
                    .map_err(|reason| invalid("--jwt-rule", "JWT_RULE", json, reason))?,
                ca_file: self.jwt_rule_ca_file.clone(),
            }),
        };
        let trusted_gateway_cidrs = self
            .trusted_gateway_cidrs
            .iter()
            .map(|c| c.trim())
            .filter(|c| !c.is_empty())
            .map(|c| {
                c.parse::<Cidr>().map_err(|reason| {
                    invalid("--trusted-gateway-cidrs", "TRUSTED_GATEWAY_CIDR", c, reason)
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let impersonation = self.impersonation_config(kubernetes.is_some())?;
        let jwt = match (self.jwt_issuer, self.jwks_file) {
            (Some(issuer), Some(jwks_file)) => {
                let audiences: Vec<String> = self
                    .jwt_audience
                    .into_iter()
                    .filter(|a| !a.is_empty())
                    .collect();
                if audiences.is_empty() {
                    return Err(invalid(
                        "--jwt-audience",
                        "PLUGCA_JWT_AUDIENCE",
                        "",
                        "at least one audience is needed".into(),
                    ));
                }
                Some(JwtConfig {
                    issuer,
                    jwks_file,
                    audiences,
                })
            }
            (None, None) => None,
            _ => return Err(ConfigError::JwtIncomplete),
        };
        if self.self_signed_dir.as_ref() == Some(&self.cacerts_dir) {
            return Err(ConfigError::SelfSignedDirIsCacertsDir(self.cacerts_dir));
        }
        let positive = |d: Duration, flag, env, v: &str| {
            if d.is_zero() {
                Err(invalid(flag, env, v, "must be positive".into()))
            } else {
                Ok(d)
            }
        };
        let max_concurrent_signs = match self.max_concurrent_signs {
            Some(0) => {
                return Err(invalid(
                    "--max-concurrent-signs",
                    "PLUGCA_MAX_CONCURRENT_SIGNS",
                    "0",
                    "must be at least 1".into(),
                ));
            }
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(2, |n| n.get()),
        };
        Ok(Config {
            cacerts_dir: self.cacerts_dir,
            grpc_addr: addr("--grpc-addr", "PLUGCA_GRPC_ADDR", &self.grpc_addr)?,
            monitoring_addr: addr(
                "--monitoring-addr",
                "PLUGCA_MONITORING_ADDR",
                &self.monitoring_addr,
            )?,
            trust_domain,
            default_ttl,
            max_ttl,
            jwt,
            jwt_rule,
            server_dns_names: self
                .server_dns_names
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect(),
            insecure_trust_csr_identity: self.insecure_trust_csr_identity,
            impersonation,
            kubernetes,
            trusted_gateway_cidrs: (!trusted_gateway_cidrs.is_empty())
                .then_some(trusted_gateway_cidrs),
            max_concurrent_signs,
            sign_queue_timeout: dur(
                "--sign-queue-timeout",
                "PLUGCA_SIGN_QUEUE_TIMEOUT",
                &self.sign_queue_timeout,
            )?,
            self_signed_ttl: dur(
                "--self-signed-ttl",
                "CITADEL_SELF_SIGNED_CA_CERT_TTL",
                &self.self_signed_ttl,
            )?,
            self_signed_key: self.self_signed_key,
            self_signed_dir: self.self_signed_dir,
            allow_root_replacement: self.allow_root_replacement,
            extra_trust_roots: self.extra_trust_roots,
            expiry_warning: dur(
                "--expiry-warning",
                "PLUGCA_EXPIRY_WARNING",
                &self.expiry_warning,
            )?,
            reload_interval: positive(
                dur(
                    "--reload-interval",
                    "PLUGCA_RELOAD_INTERVAL",
                    &self.reload_interval,
                )?,
                "--reload-interval",
                "PLUGCA_RELOAD_INTERVAL",
                &self.reload_interval,
            )?,
            drain_timeout: dur(
                "--drain-timeout",
                "PLUGCA_DRAIN_TIMEOUT",
                &self.drain_timeout,
            )?,
            faults: if self.enable_fault_injection || !self.faults.is_empty() {
                Some(
                    self.faults
                        .iter()
                        .filter(|f| !f.is_empty())
                        .map(|f| {
                            f.parse::<Fault>()
                                .map_err(|e| invalid("--fault", "PLUGCA_FAULTS", f, e.to_string()))
                        })
                        .collect::<Result<_, _>>()?,
                )
            } else {
                None
            },
            log_format: self.log_format,
            trust_domain_aliases: self
                .trust_domain_aliases
                .iter()
                .map(|a| a.trim())
                .filter(|a| !a.is_empty())
                .map(|a| {
                    TrustDomain::parse(a).map_err(|e| {
                        invalid(
                            "--trust-domain-aliases",
                            "PLUGCA_TRUST_DOMAIN_ALIASES",
                            a,
                            e.to_string(),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        })
    }
}

impl ServeArgs {
    /// Unlike istiod, which ignores malformed entries with a warning, a
    /// trusted account that is not `namespace/name` is a start-up error.
    fn impersonation_config(&self, kubernetes: bool) -> Result<ImpersonationConfig, ConfigError> {
        let trusted_node_accounts = self
            .trusted_node_accounts
            .iter()
            .map(|a| a.trim())
            .filter(|a| !a.is_empty())
            .map(|a| {
                a.parse::<NodeAccount>()
                    .map_err(|reason| ConfigError::Invalid {
                        flag: "--trusted-node-accounts",
                        env: "CA_TRUSTED_NODE_ACCOUNTS",
                        value: a.to_string(),
                        reason: format!("{reason} (expected namespace/service-account, e.g. istio-system/ztunnel)"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        match (&self.impersonation_policy, trusted_node_accounts.is_empty()) {
            (Some(_), true) => return Err(ConfigError::PolicyWithoutTrustedAccounts),
            (None, false) if !kubernetes => return Err(ConfigError::NoImpersonationAuthorizer),
            _ => {}
        }
        Ok(ImpersonationConfig {
            trusted_node_accounts,
            policy_file: self.impersonation_policy.clone(),
        })
    }

    fn kubernetes_config(&self) -> Result<Option<KubernetesConfig>, ConfigError> {
        let local = match (&self.kubeconfig, &self.kubernetes_service_host) {
            _ if self.no_kubernetes => None,
            (Some(path), _) => Some(KubeSource::Kubeconfig(path.clone())),
            (None, Some(host)) if !host.is_empty() => Some(KubeSource::InCluster),
            (None, _) => None,
        };
        let Some(local) = local else {
            if self.remote_kubeconfigs.is_some() {
                return Err(ConfigError::RemoteWithoutLocal);
            }
            return Ok(None);
        };
        let invalid = |flag, env, value: &str, reason: &str| ConfigError::Invalid {
            flag,
            env,
            value: value.to_string(),
            reason: reason.to_string(),
        };
        if self.cluster_id.is_empty() {
            return Err(invalid(
                "--cluster-id",
                "CLUSTER_ID",
                "",
                "the local cluster needs an id",
            ));
        }
        let token_audiences: Vec<String> = self
            .token_audiences
            .iter()
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect();
        if token_audiences.is_empty() {
            return Err(invalid(
                "--token-audiences",
                "TOKEN_AUDIENCES",
                "",
                "at least one audience is needed",
            ));
        }
        let api_timeout = duration::parse(&self.kube_api_timeout)
            .map_err(|e| e.to_string())
            .and_then(|d| {
                if d.is_zero() {
                    Err("must be positive".to_string())
                } else {
                    Ok(d)
                }
            })
            .map_err(|reason| {
                invalid(
                    "--kube-api-timeout",
                    "PLUGCA_KUBE_API_TIMEOUT",
                    &self.kube_api_timeout,
                    &reason,
                )
            })?;
        let token_review_cache_ttl =
            duration::parse(&self.token_review_cache_ttl).map_err(|e| {
                invalid(
                    "--token-review-cache-ttl",
                    "PLUGCA_TOKEN_REVIEW_CACHE_TTL",
                    &self.token_review_cache_ttl,
                    &e.to_string(),
                )
            })?;
        Ok(Some(KubernetesConfig {
            local,
            cluster_id: self.cluster_id.clone(),
            remote_kubeconfigs: self.remote_kubeconfigs.clone(),
            token_audiences,
            api_timeout,
            token_review_cache_ttl,
            allow_remote_exec: self.allow_remote_kubeconfig_exec,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut all = vec!["plugca"];
        all.extend_from_slice(args);
        T::try_parse_from(all).unwrap().serve.into_config()
    }

    #[test]
    fn defaults_match_istiod() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.cacerts_dir, PathBuf::from("/etc/cacerts"));
        assert_eq!(c.grpc_addr.port(), 15012);
        assert_eq!(c.monitoring_addr.port(), 15014);
        assert_eq!(c.trust_domain.as_str(), "cluster.local");
        assert_eq!(c.default_ttl, Duration::from_secs(86_400));
        assert_eq!(c.max_ttl, Duration::from_secs(2160 * 3600));
        assert!(c.jwt.is_none());
        assert!(!c.insecure_trust_csr_identity);
    }

    #[test]
    fn jwt_settings_need_both_issuer_and_jwks() {
        assert_eq!(
            parse(&["--jwt-issuer", "x"]).unwrap_err(),
            ConfigError::JwtIncomplete
        );
        let c = parse(&[
            "--jwt-issuer",
            "x",
            "--jwks-file",
            "/j",
            "--jwt-audience",
            "a",
            "--jwt-audience",
            "b",
        ])
        .unwrap();
        assert_eq!(c.jwt.unwrap().audiences, ["a", "b"]);
    }

    #[test]
    fn bad_values_name_the_flag_and_env() {
        let e = parse(&["--default-ttl", "soon"]).unwrap_err().to_string();
        assert!(
            e.starts_with("--default-ttl (env DEFAULT_WORKLOAD_CERT_TTL): \"soon\""),
            "{e}"
        );
        let e = parse(&["--grpc-addr", "nowhere"]).unwrap_err().to_string();
        assert!(e.contains("--grpc-addr"), "{e}");
        let e = parse(&["--trust-domain", "Bad/TD"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("TRUST_DOMAIN"), "{e}");
    }

    #[test]
    fn server_dns_names_are_comma_separated() {
        let c = parse(&["--server-dns-names", "a.com,b.com"]).unwrap();
        assert_eq!(c.server_dns_names, ["a.com", "b.com"]);
    }

    #[test]
    fn trusted_node_accounts_must_be_namespace_slash_name() {
        let e = parse(&["--trusted-node-accounts", "istio-system/ztunnel,ztunnel"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "--trusted-node-accounts (env CA_TRUSTED_NODE_ACCOUNTS): \"ztunnel\": not namespace/service-account (expected namespace/service-account, e.g. istio-system/ztunnel)"
        );
        let c = parse(&[
            "--trusted-node-accounts",
            "istio-system/ztunnel, kube-system/node-agent",
            "--impersonation-policy",
            "/p.json",
        ])
        .unwrap();
        assert_eq!(
            c.impersonation
                .trusted_node_accounts
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["istio-system/ztunnel", "kube-system/node-agent"]
        );
    }

    #[test]
    fn kubernetes_comes_from_a_kubeconfig_or_the_pod_environment() {
        let c = parse(&["--kubeconfig", "/k"]).unwrap().kubernetes.unwrap();
        assert_eq!(c.local, KubeSource::Kubeconfig(PathBuf::from("/k")));
        assert_eq!(c.cluster_id, "Kubernetes");
        assert_eq!(c.token_audiences, ["istio-ca"]);
        assert_eq!(c.api_timeout, Duration::from_secs(5));
        let c = parse(&["--kubernetes-service-host", "10.0.0.1"])
            .unwrap()
            .kubernetes
            .unwrap();
        assert_eq!(c.local, KubeSource::InCluster);
        assert!(
            parse(&["--kubernetes-service-host", "10.0.0.1", "--no-kubernetes"])
                .unwrap()
                .kubernetes
                .is_none()
        );
        assert!(parse(&[]).unwrap().kubernetes.is_none());
        let c = parse(&[
            "--kubeconfig",
            "/k",
            "--cluster-id",
            "east",
            "--token-audiences",
            "istio-ca,other",
            "--kube-api-timeout",
            "1s",
        ])
        .unwrap()
        .kubernetes
        .unwrap();
        assert_eq!(c.cluster_id, "east");
        assert_eq!(c.token_audiences, ["istio-ca", "other"]);
        assert_eq!(c.api_timeout, Duration::from_secs(1));
    }

    #[test]
    fn a_jwt_rule_is_istiods_json() {
        assert!(parse(&[]).unwrap().jwt_rule.is_none());
        assert!(parse(&["--jwt-rule", ""]).unwrap().jwt_rule.is_none());
        let c = parse(&[
            "--jwt-rule",
            r#"{"issuer":"https://idp","jwks_uri":"https://idp/keys","audiences":["istio-ca"]}"#,
        ])
        .unwrap();
        assert_eq!(c.jwt_rule.unwrap().rule.issuer, "https://idp");
        let e = parse(&["--jwt-rule", r#"{"issuer":"https://idp"}"#])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--jwt-rule (env JWT_RULE): "), "{e}");
        assert!(
            e.ends_with("\"audiences\" needs at least one audience"),
            "{e}"
        );
    }

    #[test]
    fn trusted_gateway_cidrs_enable_xfcc() {
        assert!(parse(&[]).unwrap().trusted_gateway_cidrs.is_none());
        let c = parse(&["--trusted-gateway-cidrs", "172.17.0.0/16, 2001:db8::/56"]).unwrap();
        assert_eq!(
            c.trusted_gateway_cidrs
                .unwrap()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["172.17.0.0/16", "2001:db8::/56"]
        );
        let e = parse(&["--trusted-gateway-cidrs", "172.17.0.1"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "--trusted-gateway-cidrs (env TRUSTED_GATEWAY_CIDR): \"172.17.0.1\": not a CIDR like 172.17.0.0/16 (no /prefix)"
        );
    }

    #[test]
    fn bad_kubernetes_settings_are_refused() {
        assert_eq!(
            parse(&["--remote-kubeconfigs", "/d"]).unwrap_err(),
            ConfigError::RemoteWithoutLocal
        );
        let e = parse(&["--kubeconfig", "/k", "--kube-api-timeout", "0s"])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--kube-api-timeout (env PLUGCA_KUBE_API_TIMEOUT)"),
            "{e}"
        );
        let e = parse(&["--kubeconfig", "/k", "--token-audiences", ","])
            .unwrap_err()
            .to_string();
        assert!(e.contains("TOKEN_AUDIENCES"), "{e}");
        // With Kubernetes, node authorization checks impersonation targets.
        assert!(
            parse(&[
                "--kubeconfig",
                "/k",
                "--trusted-node-accounts",
                "istio-system/ztunnel"
            ])
            .is_ok()
        );
    }

    #[test]
    fn trust_domain_aliases_are_validated_trust_domains() {
        assert!(parse(&[]).unwrap().trust_domain_aliases.is_empty());
        let c = parse(&["--trust-domain-aliases", "old.td, other@td"]).unwrap();
        assert_eq!(
            c.trust_domain_aliases
                .iter()
                .map(TrustDomain::as_str)
                .collect::<Vec<_>>(),
            ["old.td", "other.td"]
        );
        let e = parse(&["--trust-domain-aliases", "Bad/TD"])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--trust-domain-aliases (env PLUGCA_TRUST_DOMAIN_ALIASES): \"Bad/TD\""),
            "{e}"
        );
    }

    #[test]
    fn the_token_review_cache_lifetime_defaults_to_a_minute() {
        let k = parse(&["--kubeconfig", "/k"]).unwrap().kubernetes.unwrap();
        assert_eq!(k.token_review_cache_ttl, Duration::from_secs(60));
        assert!(!k.allow_remote_exec);
        let k = parse(&[
            "--kubeconfig",
            "/k",
            "--token-review-cache-ttl",
            "0s",
            "--allow-remote-kubeconfig-exec",
        ])
        .unwrap()
        .kubernetes
        .unwrap();
        assert_eq!(k.token_review_cache_ttl, Duration::ZERO);
        assert!(k.allow_remote_exec);
        let e = parse(&["--kubeconfig", "/k", "--token-review-cache-ttl", "soon"])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--token-review-cache-ttl (env PLUGCA_TOKEN_REVIEW_CACHE_TTL)"),
            "{e}"
        );
    }

    #[test]
    fn impersonation_needs_both_trusted_accounts_and_an_authorizer() {
        assert_eq!(
            parse(&["--impersonation-policy", "/p.json"]).unwrap_err(),
            ConfigError::PolicyWithoutTrustedAccounts
        );
        assert_eq!(
            parse(&["--trusted-node-accounts", "istio-system/ztunnel"]).unwrap_err(),
            ConfigError::NoImpersonationAuthorizer
        );
        assert_eq!(
            parse(&[]).unwrap().impersonation,
            ImpersonationConfig::default()
        );
    }
}
