//! `plugca serve` flags and environment, turned into a typed [`Config`] in one
//! pure step. Config holds paths, never secrets, so it is safe to log.

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use clap::Args;

use crate::authn::jwks::JwtRule;
use crate::authn::xfcc::Cidr;
use crate::ca::generate::KeyChoice;
use crate::duration;
use crate::identity::TrustDomain;
use crate::impersonation::NodeAccount;
use crate::kubernetes::{KubeSource, KubernetesConfig};
use crate::server::harness::Fault;

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
pub const DEFAULT_NODE_AUTHZ_MAX_STALENESS: &str = "30s";

/// Flags of `plugca serve`. Each can also be set from the environment variable shown.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Directory with the plugged-in CA: ca-cert.pem, ca-key.pem, cert-chain.pem,
    /// root-cert.pem (or tls.crt, tls.key, ca.crt). A missing, unreadable or
    /// empty directory stops the server at start, unless --self-signed is given.
    #[arg(long, env = "ROOT_CA_DIR", default_value = DEFAULT_CACERTS_DIR)]
    pub cacerts_dir: PathBuf,

    /// Run on a generated self-signed root while --cacerts-dir holds no
    /// bundle (a bundle plugged in later replaces it). Implied by
    /// --self-signed-dir and --self-signed-secret. Without it, no bundle is
    /// an error at start.
    #[arg(long, env = "PLUGCA_SELF_SIGNED")]
    pub self_signed: bool,

    /// Address of the gRPC (TLS) listener.
    #[arg(long, env = flag::GRPC_ADDR.env, default_value = DEFAULT_GRPC_ADDR)]
    pub grpc_addr: String,

    /// Address of the HTTP monitoring listener (/ready, /healthz, /metrics).
    #[arg(long, env = flag::MONITORING_ADDR.env, default_value = DEFAULT_MONITORING_ADDR)]
    pub monitoring_addr: String,

    /// Trust domain of issued SPIFFE identities ('@' is turned into '.').
    #[arg(long, env = flag::TRUST_DOMAIN.env, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Lifetime of a certificate when the request asks for none (Go duration: 90m, 24h, 1h30m).
    #[arg(long, env = flag::DEFAULT_TTL.env, default_value = DEFAULT_WORKLOAD_CERT_TTL)]
    pub default_ttl: String,

    /// Longest lifetime a request may ask for; longer requests are refused.
    #[arg(long, env = flag::MAX_TTL.env, default_value = MAX_WORKLOAD_CERT_TTL)]
    pub max_ttl: String,

    /// Issuer (`iss`) of bearer JWTs to accept; needs --jwks-file.
    #[arg(long, env = "PLUGCA_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// JWKS file with the keys that sign bearer JWTs (RS256, ES256); needs --jwt-issuer.
    #[arg(long, env = "PLUGCA_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,

    /// Accepted JWT audience; repeat the flag (or comma-separate in the env) for several.
    #[arg(long, env = flag::JWT_AUDIENCE.env, value_delimiter = ',', default_value = DEFAULT_JWT_AUDIENCE)]
    pub jwt_audience: Vec<String>,

    /// istiod's JWT_RULE: accept bearer JWTs of an OIDC issuer whose keys are
    /// fetched over HTTPS, as JSON {"issuer": "https://...", "jwks_uri":
    /// "https://...", "audiences": ["..."]}; without jwks_uri the issuer's
    /// /.well-known/openid-configuration names it.
    #[arg(long, env = flag::JWT_RULE.env)]
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
    #[arg(long, env = flag::MAX_CONCURRENT_SIGNS.env)]
    pub max_concurrent_signs: Option<usize>,

    /// How long a request waits for a signing slot before RESOURCE_EXHAUSTED.
    #[arg(long, env = flag::SIGN_QUEUE_TIMEOUT.env, default_value = DEFAULT_SIGN_QUEUE_TIMEOUT)]
    pub sign_queue_timeout: String,

    /// Lifetime of the generated self-signed root (when no bundle is plugged in).
    #[arg(long, env = flag::SELF_SIGNED_TTL.env, default_value = DEFAULT_SELF_SIGNED_TTL)]
    pub self_signed_ttl: String,

    /// Key type of the generated self-signed root.
    #[arg(long, env = "PLUGCA_SELF_SIGNED_KEY", value_enum, default_value_t = KeyChoice::P256)]
    pub self_signed_key: KeyChoice,

    /// Directory to keep the self-signed root and key in (key mode 0600), so a
    /// restart keeps the same root; implies --self-signed. Must not be the
    /// cacerts directory nor inside it (compared after resolving links).
    #[arg(long, env = "PLUGCA_SELF_SIGNED_DIR")]
    pub self_signed_dir: Option<PathBuf>,

    /// Keep the self-signed root in this Secret (namespace/name), shared by
    /// every replica like istiod's istio-ca-secret: read at start, created
    /// (create-only) when absent, never overwritten, re-read every
    /// --reload-interval. Needs Kubernetes API access; lets --replicas
    /// exceed 1 without a plugged-in CA.
    #[arg(long, env = flag::SELF_SIGNED_SECRET.env)]
    pub self_signed_secret: Option<String>,

    /// Accept a reloaded root-cert.pem that shares no root with the current one.
    /// Without it only adding or removing roots is accepted (safe rotation).
    #[arg(long, env = "PLUGCA_ALLOW_ROOT_REPLACEMENT")]
    pub allow_root_replacement: bool,

    /// PEM file of extra roots (an old root, a peer cluster's root) appended to
    /// the root bundle sent to workloads.
    #[arg(long, env = "PLUGCA_EXTRA_TRUST_ROOTS")]
    pub extra_trust_roots: Option<PathBuf>,

    /// Warn (log and metric) when the signing cert or a root expires within this.
    #[arg(long, env = flag::EXPIRY_WARNING.env, default_value = DEFAULT_EXPIRY_WARNING)]
    pub expiry_warning: String,

    /// Re-check the cacerts directory this often even without file events.
    #[arg(long, env = flag::RELOAD_INTERVAL.env, default_value = DEFAULT_RELOAD_INTERVAL)]
    pub reload_interval: String,

    /// On SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, env = flag::DRAIN_TIMEOUT.env, default_value = DEFAULT_DRAIN_TIMEOUT)]
    pub drain_timeout: String,

    /// TEST HARNESSES ONLY: enable fault injection and the admin endpoints on the
    /// monitoring port (`PUT/POST/DELETE /faults`, `GET /issued`).
    #[arg(long, env = "PLUGCA_ENABLE_FAULT_INJECTION")]
    pub enable_fault_injection: bool,

    /// A fault applied to every request (implies --enable-fault-injection); repeatable.
    /// One of refuse:<grpc code>[:message], empty-chain, leaf-only, latency:<duration>,
    /// expired, not-yet-valid, ttl:<duration>, wrong-key.
    #[arg(long = "fault", env = flag::FAULT.env, value_delimiter = ',')]
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
    #[arg(long, env = flag::CLUSTER_ID.env, default_value = DEFAULT_CLUSTER_ID)]
    pub cluster_id: String,

    /// Directory of kubeconfig files, one per remote cluster; the file name is
    /// the cluster id that requests name in their clusterid header.
    #[arg(long, env = "PLUGCA_REMOTE_KUBECONFIGS")]
    pub remote_kubeconfigs: Option<PathBuf>,

    /// Audiences put in TokenReviews (comma-separated): tokens must be issued for one.
    #[arg(long, env = flag::TOKEN_AUDIENCES.env, value_delimiter = ',', default_value = DEFAULT_TOKEN_AUDIENCES)]
    pub token_audiences: Vec<String>,

    /// Longest wait for the Kubernetes API server per TokenReview; past it the
    /// request fails with UNAVAILABLE (clients retry).
    #[arg(long, env = flag::KUBE_API_TIMEOUT.env, default_value = DEFAULT_KUBE_API_TIMEOUT)]
    pub kube_api_timeout: String,

    /// CIDRs of gateways (comma-separated) whose x-forwarded-client-cert header
    /// is trusted for the caller's identities; loopback peers are always
    /// trusted once this is set. Empty: XFCC is ignored.
    #[arg(long, env = flag::TRUSTED_GATEWAY_CIDRS.env, value_delimiter = ',')]
    pub trusted_gateway_cidrs: Vec<String>,

    /// Service accounts (namespace/name, comma-separated) that may ask for other
    /// identities' certificates with ImpersonatedIdentity (ztunnel in shared
    /// mode), e.g. istio-system/ztunnel. Targets are then checked by Kubernetes
    /// node authorization and/or --impersonation-policy.
    #[arg(long, env = flag::TRUSTED_NODE_ACCOUNTS.env, value_delimiter = ',')]
    pub trusted_node_accounts: Vec<String>,

    /// JSON file listing which trusted node accounts may impersonate which
    /// identities, for setups without Kubernetes: [{"caller": "istio-system/ztunnel",
    /// "may_impersonate": ["ns-a/*", "ns-b/sa-b", "*/default"]}]. Nothing else is allowed.
    #[arg(long, env = "PLUGCA_IMPERSONATION_POLICY")]
    pub impersonation_policy: Option<PathBuf>,

    /// How long node authorization may keep answering from the last known
    /// pods while a cluster's pod watch fails. Past it, impersonation there
    /// gets UNAVAILABLE (clients retry) until the watch has re-listed.
    #[arg(long, env = flag::NODE_AUTHZ_MAX_STALENESS.env, default_value = DEFAULT_NODE_AUTHZ_MAX_STALENESS)]
    pub node_authz_max_staleness: String,

    /// Log format.
    #[arg(long, env = "PLUGCA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log lines queued for stderr; when stderr is not read fast enough,
    /// lines past this are dropped and counted
    /// (plugca_log_lines_dropped_total) instead of blocking requests.
    #[arg(long, env = flag::LOG_BUFFER_LINES.env, default_value_t = crate::logging::DEFAULT_BUFFER_LINES)]
    pub log_buffer_lines: usize,

    // In-cluster controllers (issue 10): --root-configmap*, --istiod-*, --leader-election-*.
    #[command(flatten)]
    pub controllers: crate::controllers::args::ControllersArgs,
    /// Connection, stream, request and age limits of the listeners.
    #[command(flatten)]
    pub net: crate::limits::NetArgs,
    // Authentication and reload hardening (issue #12 items 5-8, 10; #9 item 5).
    /// Other trust domains (comma-separated) the CA may issue SPIFFE identities
    /// in besides --trust-domain, like istiod's meshConfig trustDomainAliases.
    /// Identities in any other trust domain are refused, whoever asks.
    #[arg(long, env = flag::TRUST_DOMAIN_ALIASES.env, value_delimiter = ',')]
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
    #[arg(long, env = flag::TOKEN_REVIEW_CACHE_TTL.env, default_value = DEFAULT_TOKEN_REVIEW_CACHE_TTL)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImpersonationConfig {
    pub trusted_node_accounts: Vec<NodeAccount>,
    pub policy_file: Option<PathBuf>,
    /// `--node-authz-max-staleness`.
    pub node_authz_max_staleness: Duration,
}

impl Default for ImpersonationConfig {
    fn default() -> Self {
        ImpersonationConfig {
            trusted_node_accounts: Vec::new(),
            policy_file: None,
            node_authz_max_staleness: duration::parse(DEFAULT_NODE_AUTHZ_MAX_STALENESS)
                .expect("the default is a valid duration"),
        }
    }
}

/// Validated server configuration, grouped by the part of the server that
/// reads it.
#[derive(Debug, Clone)]
pub struct Config {
    /// Of issued SPIFFE identities; also the self-signed root's organization.
    pub trust_domain: TrustDomain,
    pub server: ServerConfig,
    pub ca: CaConfig,
    pub authn: AuthnConfig,
    pub impersonation: ImpersonationConfig,
    pub issuance: IssuanceConfig,
    /// `Some` (possibly empty) when fault injection is enabled.
    pub faults: Option<Vec<Fault>>,
    pub log_format: LogFormat,
    /// Lines the log queue holds before dropping (see `crate::logging`).
    pub log_buffer_lines: usize,
    /// The in-cluster controllers; each is off unless its flag is given.
    pub controllers: crate::controllers::ControllersConfig,
    pub net: crate::limits::NetConfig,
    /// `--trust-domain-aliases`: where else SPIFFE identities may be issued.
    pub trust_domain_aliases: Vec<TrustDomain>,
}

/// The listeners and the gRPC server around the handler.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub grpc_addr: SocketAddr,
    pub monitoring_addr: SocketAddr,
    /// Extra DNS names of the serving certificate.
    pub server_dns_names: Vec<String>,
    pub drain_timeout: Duration,
}

/// The CA bundle: where it is, the self-signed fallback, and reloading.
#[derive(Debug, Clone)]
pub struct CaConfig {
    pub cacerts_dir: PathBuf,
    /// `--self-signed` (or `--self-signed-dir`): a generated root is asked
    /// for when the cacerts directory holds no bundle.
    pub self_signed: bool,
    pub self_signed_ttl: Duration,
    pub self_signed_key: KeyChoice,
    pub self_signed_dir: Option<PathBuf>,
    /// `--self-signed-secret`: the Secret all replicas keep the self-signed root in.
    pub self_signed_secret: Option<crate::controllers::shared_root::SecretRef>,
    pub allow_root_replacement: bool,
    pub extra_trust_roots: Option<PathBuf>,
    pub expiry_warning: Duration,
    pub reload_interval: Duration,
}

/// The authenticators to build; each `None` is off.
#[derive(Debug, Clone)]
pub struct AuthnConfig {
    pub jwt: Option<JwtConfig>,
    pub jwt_rule: Option<JwtRuleConfig>,
    /// `Some` when Kubernetes authentication (and node authorization) is on.
    pub kubernetes: Option<KubernetesConfig>,
    /// `Some` (non-empty) when the XFCC authenticator is on.
    pub trusted_gateway_cidrs: Option<Vec<Cidr>>,
    pub insecure_trust_csr_identity: bool,
}

/// Lifetimes of issued certificates and the signing limits.
#[derive(Debug, Clone)]
pub struct IssuanceConfig {
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub max_concurrent_signs: usize,
    pub sign_queue_timeout: Duration,
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
        "--self-signed-dir {self_signed_dir} resolves to {resolved}, which is {relation} --cacerts-dir {cacerts_dir}: the generated root would be written into the plugged-in CA directory; use a directory outside it"
    )]
    SelfSignedDirInCacertsDir {
        self_signed_dir: PathBuf,
        cacerts_dir: PathBuf,
        resolved: PathBuf,
        /// `the same directory as` or `inside`.
        relation: &'static str,
    },
    #[error(
        "--self-signed-secret and --self-signed-dir are both set: keep the self-signed root in one place"
    )]
    SelfSignedSecretAndDir,
    #[error(
        "--self-signed-secret needs Kubernetes API access (--kubeconfig, or running in a pod without --no-kubernetes)"
    )]
    SelfSignedSecretWithoutKubernetes,
    /// Flags clap refused (unknown flag, missing value), in clap's words;
    /// only [`Config::from_args`] returns it (the binary lets clap exit).
    #[error("{0}")]
    Flags(String),
}

impl Config {
    /// The config `plugca serve <args>` would run with (the environment
    /// applies as for the binary), for tests and tools that start servers
    /// in-process: `Config::from_args(&["--grpc-addr", "127.0.0.1:0"])`.
    pub fn from_args<S: AsRef<str>>(args: &[S]) -> Result<Config, ConfigError> {
        #[derive(clap::Parser)]
        struct Serve {
            #[command(flatten)]
            args: ServeArgs,
        }
        let argv = std::iter::once("plugca serve").chain(args.iter().map(AsRef::as_ref));
        <Serve as clap::Parser>::try_parse_from(argv)
            .map_err(|e| ConfigError::Flags(e.to_string()))?
            .args
            .into_config()
    }
}

/// A `plugca serve` flag and its environment variable, as errors name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flag {
    name: &'static str,
    env: &'static str,
}

impl Flag {
    const fn new(name: &'static str, env: &'static str) -> Flag {
        Flag { name, env }
    }

    fn invalid(self, value: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            flag: self.name,
            env: self.env,
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    fn addr(self, value: &str) -> Result<SocketAddr, ConfigError> {
        value
            .parse()
            .map_err(|e| self.invalid(value, format!("not an address like 0.0.0.0:15012: {e}")))
    }

    fn duration(self, value: &str) -> Result<Duration, ConfigError> {
        duration::parse(value).map_err(|e| self.invalid(value, e.to_string()))
    }

    fn positive_duration(self, value: &str) -> Result<Duration, ConfigError> {
        match self.duration(value)? {
            d if d.is_zero() => Err(self.invalid(value, "must be positive")),
            d => Ok(d),
        }
    }

    /// Comma-separated entries (blanks dropped), each parsed by `parse`.
    fn list<T>(
        self,
        values: &[String],
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Vec<T>, ConfigError> {
        values
            .iter()
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
            .map(|v| parse(v).map_err(|reason| self.invalid(v, reason)))
            .collect()
    }
}

/// Every flag [`ServeArgs::into_config`] can refuse, with its env.
mod flag {
    use super::Flag;

    pub(super) const GRPC_ADDR: Flag = Flag::new("--grpc-addr", "PLUGCA_GRPC_ADDR");
    pub(super) const MONITORING_ADDR: Flag =
        Flag::new("--monitoring-addr", "PLUGCA_MONITORING_ADDR");
    pub(super) const TRUST_DOMAIN: Flag = Flag::new("--trust-domain", "TRUST_DOMAIN");
    pub(super) const DEFAULT_TTL: Flag = Flag::new("--default-ttl", "DEFAULT_WORKLOAD_CERT_TTL");
    pub(super) const MAX_TTL: Flag = Flag::new("--max-ttl", "MAX_WORKLOAD_CERT_TTL");
    pub(super) const JWT_AUDIENCE: Flag = Flag::new("--jwt-audience", "PLUGCA_JWT_AUDIENCE");
    pub(super) const JWT_RULE: Flag = Flag::new("--jwt-rule", "JWT_RULE");
    pub(super) const MAX_CONCURRENT_SIGNS: Flag =
        Flag::new("--max-concurrent-signs", "PLUGCA_MAX_CONCURRENT_SIGNS");
    pub(super) const SIGN_QUEUE_TIMEOUT: Flag =
        Flag::new("--sign-queue-timeout", "PLUGCA_SIGN_QUEUE_TIMEOUT");
    pub(super) const SELF_SIGNED_TTL: Flag =
        Flag::new("--self-signed-ttl", "CITADEL_SELF_SIGNED_CA_CERT_TTL");
    pub(super) const EXPIRY_WARNING: Flag = Flag::new("--expiry-warning", "PLUGCA_EXPIRY_WARNING");
    pub(super) const RELOAD_INTERVAL: Flag =
        Flag::new("--reload-interval", "PLUGCA_RELOAD_INTERVAL");
    pub(super) const DRAIN_TIMEOUT: Flag = Flag::new("--drain-timeout", "PLUGCA_DRAIN_TIMEOUT");
    pub(super) const FAULT: Flag = Flag::new("--fault", "PLUGCA_FAULTS");
    pub(super) const CLUSTER_ID: Flag = Flag::new("--cluster-id", "CLUSTER_ID");
    pub(super) const TOKEN_AUDIENCES: Flag = Flag::new("--token-audiences", "TOKEN_AUDIENCES");
    pub(super) const KUBE_API_TIMEOUT: Flag =
        Flag::new("--kube-api-timeout", "PLUGCA_KUBE_API_TIMEOUT");
    pub(super) const TRUSTED_GATEWAY_CIDRS: Flag =
        Flag::new("--trusted-gateway-cidrs", "TRUSTED_GATEWAY_CIDR");
    pub(super) const TRUSTED_NODE_ACCOUNTS: Flag =
        Flag::new("--trusted-node-accounts", "CA_TRUSTED_NODE_ACCOUNTS");
    pub(super) const TRUST_DOMAIN_ALIASES: Flag =
        Flag::new("--trust-domain-aliases", "PLUGCA_TRUST_DOMAIN_ALIASES");
    pub(super) const TOKEN_REVIEW_CACHE_TTL: Flag =
        Flag::new("--token-review-cache-ttl", "PLUGCA_TOKEN_REVIEW_CACHE_TTL");
    pub(super) const LOG_BUFFER_LINES: Flag =
        Flag::new("--log-buffer-lines", "PLUGCA_LOG_BUFFER_LINES");
    pub(super) const NODE_AUTHZ_MAX_STALENESS: Flag = Flag::new(
        "--node-authz-max-staleness",
        "PLUGCA_NODE_AUTHZ_MAX_STALENESS",
    );
    pub(super) const SELF_SIGNED_SECRET: Flag =
        Flag::new("--self-signed-secret", "PLUGCA_SELF_SIGNED_SECRET");

    #[cfg(test)]
    pub(super) const ALL: &[Flag] = &[
        GRPC_ADDR,
        MONITORING_ADDR,
        TRUST_DOMAIN,
        DEFAULT_TTL,
        MAX_TTL,
        JWT_AUDIENCE,
        JWT_RULE,
        MAX_CONCURRENT_SIGNS,
        SIGN_QUEUE_TIMEOUT,
        SELF_SIGNED_TTL,
        EXPIRY_WARNING,
        RELOAD_INTERVAL,
        DRAIN_TIMEOUT,
        FAULT,
        CLUSTER_ID,
        TOKEN_AUDIENCES,
        KUBE_API_TIMEOUT,
        TRUSTED_GATEWAY_CIDRS,
        TRUSTED_NODE_ACCOUNTS,
        TRUST_DOMAIN_ALIASES,
        TOKEN_REVIEW_CACHE_TTL,
        LOG_BUFFER_LINES,
        NODE_AUTHZ_MAX_STALENESS,
        SELF_SIGNED_SECRET,
    ];
}

impl ServeArgs {
    /// Parses each value (errors name the flag, its env and the value) and
    /// applies the rules that span flags, in one pure step.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let trust_domain = TrustDomain::parse(&self.trust_domain)
            .map_err(|e| flag::TRUST_DOMAIN.invalid(&self.trust_domain, e.to_string()))?;
        let default_ttl = flag::DEFAULT_TTL.duration(&self.default_ttl)?;
        let max_ttl = flag::MAX_TTL.duration(&self.max_ttl)?;
        if default_ttl.is_zero() {
            return Err(flag::DEFAULT_TTL.invalid(&self.default_ttl, "must be positive"));
        }
        if max_ttl.is_zero() {
            return Err(flag::MAX_TTL.invalid(&self.max_ttl, "must be positive"));
        }
        let kubernetes = self.kubernetes_config()?;
        let jwt_rule = match self.jwt_rule.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(json) => Some(JwtRuleConfig {
                rule: JwtRule::parse(json)
                    .map_err(|reason| flag::JWT_RULE.invalid(json, reason))?,
                ca_file: self.jwt_rule_ca_file.clone(),
            }),
        };
        let trusted_gateway_cidrs =
            flag::TRUSTED_GATEWAY_CIDRS.list(&self.trusted_gateway_cidrs, str::parse::<Cidr>)?;
        let impersonation = self.impersonation_config(kubernetes.is_some())?;
        let jwt = match (self.jwt_issuer, self.jwks_file) {
            (Some(issuer), Some(jwks_file)) => {
                let audiences: Vec<String> = self
                    .jwt_audience
                    .into_iter()
                    .filter(|a| !a.is_empty())
                    .collect();
                if audiences.is_empty() {
                    return Err(flag::JWT_AUDIENCE.invalid("", "at least one audience is needed"));
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
        if let Some(dir) = &self.self_signed_dir {
            check_self_signed_dir(dir, &self.cacerts_dir)?;
        }
        let self_signed_secret = match self.self_signed_secret.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(_) if self.self_signed_dir.is_some() => {
                return Err(ConfigError::SelfSignedSecretAndDir);
            }
            Some(_) if kubernetes.is_none() => {
                return Err(ConfigError::SelfSignedSecretWithoutKubernetes);
            }
            Some(s) => Some(
                crate::controllers::shared_root::SecretRef::parse(s)
                    .map_err(|reason| flag::SELF_SIGNED_SECRET.invalid(s, reason))?,
            ),
        };
        let max_concurrent_signs = match self.max_concurrent_signs {
            Some(0) => return Err(flag::MAX_CONCURRENT_SIGNS.invalid("0", "must be at least 1")),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(2, |n| n.get()),
        };
        let grpc_addr = flag::GRPC_ADDR.addr(&self.grpc_addr)?;
        let monitoring_addr = flag::MONITORING_ADDR.addr(&self.monitoring_addr)?;
        let sign_queue_timeout = flag::SIGN_QUEUE_TIMEOUT.duration(&self.sign_queue_timeout)?;
        let self_signed_ttl = flag::SELF_SIGNED_TTL.duration(&self.self_signed_ttl)?;
        let expiry_warning = flag::EXPIRY_WARNING.duration(&self.expiry_warning)?;
        let reload_interval = flag::RELOAD_INTERVAL.positive_duration(&self.reload_interval)?;
        let drain_timeout = flag::DRAIN_TIMEOUT.duration(&self.drain_timeout)?;
        let faults = if self.enable_fault_injection || !self.faults.is_empty() {
            Some(
                self.faults
                    .iter()
                    .filter(|f| !f.is_empty())
                    .map(|f| {
                        f.parse::<Fault>()
                            .map_err(|e| flag::FAULT.invalid(f, e.to_string()))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            )
        } else {
            None
        };
        if let Some(list) = &faults {
            crate::server::harness::check_ttl(list, Some(max_ttl))
                .map_err(|reason| flag::FAULT.invalid(&self.faults.join(","), reason))?;
        }
        if self.log_buffer_lines == 0 {
            return Err(flag::LOG_BUFFER_LINES.invalid("0", "must be at least 1"));
        }
        let controllers = self.controllers.clone().into_config(&trust_domain)?;
        Ok(Config {
            trust_domain,
            server: ServerConfig {
                grpc_addr,
                monitoring_addr,
                server_dns_names: self
                    .server_dns_names
                    .into_iter()
                    .filter(|s| !s.is_empty())
                    .collect(),
                drain_timeout,
            },
            ca: CaConfig {
                cacerts_dir: self.cacerts_dir,
                self_signed: self.self_signed
                    || self.self_signed_dir.is_some()
                    || self_signed_secret.is_some(),
                self_signed_ttl,
                self_signed_key: self.self_signed_key,
                self_signed_dir: self.self_signed_dir,
                self_signed_secret,
                allow_root_replacement: self.allow_root_replacement,
                extra_trust_roots: self.extra_trust_roots,
                expiry_warning,
                reload_interval,
            },
            authn: AuthnConfig {
                jwt,
                jwt_rule,
                kubernetes,
                trusted_gateway_cidrs: (!trusted_gateway_cidrs.is_empty())
                    .then_some(trusted_gateway_cidrs),
                insecure_trust_csr_identity: self.insecure_trust_csr_identity,
            },
            impersonation,
            issuance: IssuanceConfig {
                default_ttl,
                max_ttl,
                max_concurrent_signs,
                sign_queue_timeout,
            },
            faults,
            log_format: self.log_format,
            log_buffer_lines: self.log_buffer_lines,
            controllers,
            net: self.net.into_config()?,
            trust_domain_aliases: self
                .trust_domain_aliases
                .iter()
                .map(|a| a.trim())
                .filter(|a| !a.is_empty())
                .map(|a| {
                    TrustDomain::parse(a)
                        .map_err(|e| flag::TRUST_DOMAIN_ALIASES.invalid(a, e.to_string()))
                })
                .collect::<Result<_, _>>()?,
        })
    }

    /// Unlike istiod, which ignores malformed entries with a warning, a
    /// trusted account that is not `namespace/name` is a start-up error.
    fn impersonation_config(&self, kubernetes: bool) -> Result<ImpersonationConfig, ConfigError> {
        let trusted_node_accounts =
            flag::TRUSTED_NODE_ACCOUNTS.list(&self.trusted_node_accounts, |a| {
                a.parse::<NodeAccount>().map_err(|reason| {
                    format!(
                        "{reason} (expected namespace/service-account, e.g. istio-system/ztunnel)"
                    )
                })
            })?;
        match (&self.impersonation_policy, trusted_node_accounts.is_empty()) {
            (Some(_), true) => return Err(ConfigError::PolicyWithoutTrustedAccounts),
            (None, false) if !kubernetes => return Err(ConfigError::NoImpersonationAuthorizer),
            _ => {}
        }
        Ok(ImpersonationConfig {
            trusted_node_accounts,
            policy_file: self.impersonation_policy.clone(),
            node_authz_max_staleness: flag::NODE_AUTHZ_MAX_STALENESS
                .positive_duration(&self.node_authz_max_staleness)?,
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
        if self.cluster_id.is_empty() {
            return Err(flag::CLUSTER_ID.invalid("", "the local cluster needs an id"));
        }
        let token_audiences =
            flag::TOKEN_AUDIENCES.list(&self.token_audiences, |a| Ok(a.to_string()))?;
        if token_audiences.is_empty() {
            return Err(flag::TOKEN_AUDIENCES.invalid("", "at least one audience is needed"));
        }
        let token_review_cache_ttl =
            flag::TOKEN_REVIEW_CACHE_TTL.duration(&self.token_review_cache_ttl)?;
        Ok(Some(KubernetesConfig {
            local,
            cluster_id: self.cluster_id.clone(),
            remote_kubeconfigs: self.remote_kubeconfigs.clone(),
            token_audiences,
            api_timeout: flag::KUBE_API_TIMEOUT.positive_duration(&self.kube_api_timeout)?,
            token_review_cache_ttl,
            allow_remote_exec: self.allow_remote_kubeconfig_exec,
        }))
    }
}

/// Refuses a self-signed directory that is the cacerts directory or inside
/// it, comparing the paths as the file system resolves them (`./cacerts`
/// and `cacerts`, symlinks, `..`), including directories not created yet.
fn check_self_signed_dir(self_signed_dir: &Path, cacerts_dir: &Path) -> Result<(), ConfigError> {
    let (ours, theirs) = (resolve(self_signed_dir), resolve(cacerts_dir));
    let relation = if ours == theirs {
        "the same directory as"
    } else if ours.starts_with(&theirs) {
        "inside"
    } else {
        return Ok(());
    };
    Err(ConfigError::SelfSignedDirInCacertsDir {
        self_signed_dir: self_signed_dir.to_path_buf(),
        cacerts_dir: cacerts_dir.to_path_buf(),
        resolved: ours,
        relation,
    })
}

/// `path` made absolute with symlinks and `..` resolved: the longest
/// existing prefix is canonicalized and the rest (not created yet) appended,
/// with `.` dropped and `..` applied by hand.
pub fn resolve(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            let mut out = real;
            for part in rest.iter().rev() {
                match part {
                    Component::CurDir => {}
                    Component::ParentDir => {
                        out.pop();
                    }
                    other => out.push(other.as_os_str()),
                }
            }
            return out;
        }
        match (existing.parent(), existing.components().next_back()) {
            (Some(parent), Some(last)) => {
                rest.push(last);
                existing = parent;
            }
            // Nothing exists, not even the root: compare as written.
            _ => return absolute,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        Config::from_args(args)
    }

    #[test]
    fn every_flag_an_error_names_is_a_serve_flag_with_that_env() {
        #[derive(clap::Parser)]
        struct Serve {
            #[command(flatten)]
            args: ServeArgs,
        }
        let command = <Serve as clap::CommandFactory>::command();
        for f in flag::ALL {
            let arg = command
                .get_arguments()
                .find(|a| {
                    a.get_long()
                        .is_some_and(|l| f.name.strip_prefix("--") == Some(l))
                })
                .unwrap_or_else(|| panic!("{} is not a flag of plugca serve", f.name));
            assert_eq!(
                arg.get_env(),
                Some(std::ffi::OsStr::new(f.env)),
                "{}",
                f.name
            );
        }
    }

    #[test]
    fn defaults_match_istiod() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.ca.cacerts_dir, PathBuf::from("/etc/cacerts"));
        assert_eq!(c.server.grpc_addr.port(), 15012);
        assert_eq!(c.server.monitoring_addr.port(), 15014);
        assert_eq!(c.trust_domain.as_str(), "cluster.local");
        assert_eq!(c.issuance.default_ttl, Duration::from_secs(86_400));
        assert_eq!(c.issuance.max_ttl, Duration::from_secs(2160 * 3600));
        assert!(c.authn.jwt.is_none());
        assert!(!c.authn.insecure_trust_csr_identity);
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
        assert_eq!(c.authn.jwt.unwrap().audiences, ["a", "b"]);
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
        assert_eq!(c.server.server_dns_names, ["a.com", "b.com"]);
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
        let c = parse(&["--kubeconfig", "/k"])
            .unwrap()
            .authn
            .kubernetes
            .unwrap();
        assert_eq!(c.local, KubeSource::Kubeconfig(PathBuf::from("/k")));
        assert_eq!(c.cluster_id, "Kubernetes");
        assert_eq!(c.token_audiences, ["istio-ca"]);
        assert_eq!(c.api_timeout, Duration::from_secs(5));
        let c = parse(&["--kubernetes-service-host", "10.0.0.1"])
            .unwrap()
            .authn
            .kubernetes
            .unwrap();
        assert_eq!(c.local, KubeSource::InCluster);
        assert!(
            parse(&["--kubernetes-service-host", "10.0.0.1", "--no-kubernetes"])
                .unwrap()
                .authn
                .kubernetes
                .is_none()
        );
        assert!(parse(&[]).unwrap().authn.kubernetes.is_none());
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
        .authn
        .kubernetes
        .unwrap();
        assert_eq!(c.cluster_id, "east");
        assert_eq!(c.token_audiences, ["istio-ca", "other"]);
        assert_eq!(c.api_timeout, Duration::from_secs(1));
    }

    #[test]
    fn a_jwt_rule_is_istiods_json() {
        assert!(parse(&[]).unwrap().authn.jwt_rule.is_none());
        assert!(parse(&["--jwt-rule", ""]).unwrap().authn.jwt_rule.is_none());
        let c = parse(&[
            "--jwt-rule",
            r#"{"issuer":"https://idp","jwks_uri":"https://idp/keys","audiences":["istio-ca"]}"#,
        ])
        .unwrap();
        assert_eq!(c.authn.jwt_rule.unwrap().rule.issuer, "https://idp");
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
        assert!(parse(&[]).unwrap().authn.trusted_gateway_cidrs.is_none());
        let c = parse(&["--trusted-gateway-cidrs", "172.17.0.0/16, 2001:db8::/56"]).unwrap();
        assert_eq!(
            c.authn
                .trusted_gateway_cidrs
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
        let k = parse(&["--kubeconfig", "/k"])
            .unwrap()
            .authn
            .kubernetes
            .unwrap();
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
        .authn
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
    fn a_self_signed_secret_is_namespace_slash_name_and_needs_kubernetes() {
        assert!(parse(&[]).unwrap().ca.self_signed_secret.is_none());
        let c = parse(&[
            "--kubeconfig",
            "/k",
            "--self-signed-secret",
            "istio-system/plugca-root",
        ])
        .unwrap();
        assert_eq!(
            c.ca.self_signed_secret.unwrap().to_string(),
            "istio-system/plugca-root"
        );
        assert_eq!(
            parse(&["--self-signed-secret", "istio-system/plugca-root"]).unwrap_err(),
            ConfigError::SelfSignedSecretWithoutKubernetes
        );
        assert_eq!(
            parse(&[
                "--kubeconfig",
                "/k",
                "--self-signed-secret",
                "istio-system/plugca-root",
                "--self-signed-dir",
                "/d",
            ])
            .unwrap_err(),
            ConfigError::SelfSignedSecretAndDir
        );
        let e = parse(&["--kubeconfig", "/k", "--self-signed-secret", "plugca-root"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "--self-signed-secret (env PLUGCA_SELF_SIGNED_SECRET): \"plugca-root\": not namespace/name (e.g. istio-system/plugca-root)"
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

    #[test]
    fn a_self_signed_dir_that_resolves_to_or_into_the_cacerts_dir_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path();
        std::fs::create_dir(base.join("cacerts")).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(base.join("cacerts"), base.join("link")).unwrap();
        let cacerts = base.join("cacerts");
        let mut same = vec![
            base.join("./cacerts"),
            base.join("other/../cacerts"),
            base.join("cacerts/"),
        ];
        #[cfg(unix)]
        same.push(base.join("link"));
        for dir in same {
            let e = check_self_signed_dir(&dir, &cacerts).unwrap_err();
            assert!(
                e.to_string()
                    .contains("the same directory as --cacerts-dir"),
                "{dir:?}: {e}"
            );
        }
        // Inside, and not created yet.
        let e = check_self_signed_dir(
            &base.join("cacerts/./new/deeper"),
            &base.join("x/../cacerts"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("inside --cacerts-dir"), "{e}");
        // A cacerts dir that does not exist yet is resolved the same way.
        assert!(check_self_signed_dir(&base.join("later/ss"), &base.join("./later")).is_err());
        // Siblings are fine, even with a common name prefix.
        check_self_signed_dir(&base.join("cacerts-self"), &cacerts).unwrap();
        check_self_signed_dir(&base.join("self"), &cacerts).unwrap();
    }

    #[test]
    fn self_signed_mode_is_asked_for_by_the_flag_or_a_self_signed_dir() {
        assert!(!parse(&[]).unwrap().ca.self_signed);
        assert!(parse(&["--self-signed"]).unwrap().ca.self_signed);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ss");
        assert!(
            parse(&["--self-signed-dir", dir.to_str().unwrap()])
                .unwrap()
                .ca
                .self_signed
        );
    }

    #[test]
    fn node_authorization_trusts_a_failing_pod_watch_for_thirty_seconds_by_default() {
        let c = parse(&[]).unwrap().impersonation;
        assert_eq!(c.node_authz_max_staleness, Duration::from_secs(30));
        let c = parse(&["--node-authz-max-staleness", "5s"])
            .unwrap()
            .impersonation;
        assert_eq!(c.node_authz_max_staleness, Duration::from_secs(5));
        for bad in ["0s", "soon"] {
            let e = parse(&["--node-authz-max-staleness", bad])
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!(
                    "--node-authz-max-staleness (env PLUGCA_NODE_AUTHZ_MAX_STALENESS): \"{bad}\""
                )),
                "{e}"
            );
        }
    }
}
