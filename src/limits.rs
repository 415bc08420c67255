//! Resource limits of the listeners: how many connections, handshakes, streams
//! and requests an unauthenticated peer can make the server hold, and for how
//! long. Connection caps are derived from the open-file limit at start so the
//! monitoring port can never use the descriptors gRPC and reloads need.

use std::time::Duration;

use clap::Args;

use crate::config::ConfigError;
use crate::duration;

/// HTTP/2 streams per gRPC connection: ztunnel and istio-agent use a handful.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// gRPC requests (streams) in flight across all connections; beyond it new
/// requests get RESOURCE_EXHAUSTED at once.
pub const DEFAULT_MAX_INFLIGHT_REQUESTS: usize = 1024;
/// gRPC connections (handshaking or established) from one source address.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 32;
/// Whole-request deadline, including waiting for the request body: above the
/// sign queue timeout (2 s) plus a TokenReview (5 s) with room to spare.
pub const DEFAULT_REQUEST_TIMEOUT: &str = "15s";
/// A connection older than this is sent GOAWAY and closed once its requests end.
pub const DEFAULT_MAX_CONNECTION_AGE: &str = "1h";
/// After a CA change every connection is sent GOAWAY at a point spread over
/// [a sixth of this, this): [10 s, 60 s) by default.
pub const DEFAULT_CA_CHANGE_CLOSE_WITHIN: &str = "60s";
/// A TCP peer that has not finished TLS by then is dropped.
pub const DEFAULT_HANDSHAKE_TIMEOUT: &str = "5s";
/// Cap on gRPC connections when the open-file limit allows more.
pub const MAX_GRPC_CONNECTIONS_CEILING: usize = 10_000;
/// Handshakes in progress at once, at most (sockets over it are closed at once).
pub const MAX_HANDSHAKES_CEILING: usize = 512;
/// Handshakes in progress from one source address.
pub const MAX_HANDSHAKES_PER_IP: usize = 16;
/// A TLS connection that has not sent the HTTP/2 preface by then is closed.
pub const PREFACE_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests in flight after GOAWAY (age or CA change) get this long to finish.
pub const GRACEFUL_CLOSE_GRACE: Duration = Duration::from_secs(30);
/// HTTP/2 keepalive: a peer that does not answer PINGs is dropped.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Request header block size (a CreateCertificate header block is < 2 KiB
/// even with a bearer token).
pub const HTTP2_MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// Monitoring connections at most (fewer with a low open-file limit).
pub const MAX_MONITORING_CONNECTIONS_CEILING: usize = 64;
/// Monitoring connections from one source address.
pub const MONITORING_CONNECTIONS_PER_IP: usize = 8;
/// Monitoring: the request head must arrive within this.
pub const MONITORING_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Monitoring: a connection is closed after this, idle or not (scrapes are short).
pub const MONITORING_MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// Open files kept free for everything that is not a peer connection: the
/// CA files on reload, the inotify watch, Kubernetes clients, logs.
pub const FD_RESERVE_MIN: usize = 128;
/// Assumed open-file limit when it cannot be read.
pub const FALLBACK_FD_LIMIT: usize = 1024;

/// Listener limits (flags). Connection caps left unset are derived from the
/// open-file limit.
#[derive(Debug, Clone, Args)]
pub struct NetArgs {
    /// gRPC connections at most (handshaking or established); further ones are
    /// closed at once. Default: from the open-file limit, at most 10000.
    #[arg(long, env = "PLUGCA_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// gRPC connections at most from one source address.
    #[arg(long, env = "PLUGCA_MAX_CONNECTIONS_PER_IP", default_value_t = DEFAULT_MAX_CONNECTIONS_PER_IP)]
    pub max_connections_per_ip: usize,

    /// HTTP/2 streams (concurrent requests) per gRPC connection.
    #[arg(long, env = "PLUGCA_MAX_STREAMS_PER_CONNECTION", default_value_t = DEFAULT_MAX_STREAMS_PER_CONNECTION)]
    pub max_streams_per_connection: u32,

    /// gRPC requests in flight at most; more get RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "PLUGCA_MAX_INFLIGHT_REQUESTS", default_value_t = DEFAULT_MAX_INFLIGHT_REQUESTS)]
    pub max_inflight_requests: usize,

    /// Deadline of a whole gRPC request, from its headers to its response,
    /// including waiting for the body.
    #[arg(long, env = "PLUGCA_REQUEST_TIMEOUT", default_value = DEFAULT_REQUEST_TIMEOUT)]
    pub request_timeout: String,

    /// gRPC connections older than this are closed gracefully (GOAWAY), so
    /// a client reconnects and shows its certificate again.
    #[arg(long, env = "PLUGCA_MAX_CONNECTION_AGE", default_value = DEFAULT_MAX_CONNECTION_AGE)]
    pub max_connection_age: String,

    /// After a CA change (reload, rotation) each gRPC connection is sent
    /// GOAWAY at a point spread between a sixth of this and this, so clients
    /// reconnect (and show their certificate to the new roots) without all
    /// reconnecting at once.
    #[arg(long, env = "PLUGCA_CA_CHANGE_CLOSE_WITHIN", default_value = DEFAULT_CA_CHANGE_CLOSE_WITHIN)]
    pub ca_change_close_within: String,

    /// A TCP peer that has not finished the TLS handshake by then is dropped.
    #[arg(long, env = "PLUGCA_HANDSHAKE_TIMEOUT", default_value = DEFAULT_HANDSHAKE_TIMEOUT)]
    pub handshake_timeout: String,

    /// Monitoring-port connections at most; further ones are closed at once.
    /// Default: from the open-file limit, at most 64.
    #[arg(long, env = "PLUGCA_MAX_MONITORING_CONNECTIONS")]
    pub max_monitoring_connections: Option<usize>,
}

/// [`NetArgs`], validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: usize,
    pub max_streams_per_connection: u32,
    pub max_inflight_requests: usize,
    pub request_timeout: Duration,
    pub max_connection_age: Duration,
    pub ca_change_close_within: Duration,
    pub handshake_timeout: Duration,
    pub max_monitoring_connections: Option<usize>,
}

impl NetArgs {
    pub fn into_config(self) -> Result<NetConfig, ConfigError> {
        fn invalid(
            flag: &'static str,
            env: &'static str,
            value: &str,
            reason: &str,
        ) -> ConfigError {
            ConfigError::Invalid {
                flag,
                env,
                value: value.to_string(),
                reason: reason.to_string(),
            }
        }
        let positive_dur = |flag, env, v: &str| match duration::parse(v) {
            Ok(d) if d.is_zero() => Err(invalid(flag, env, v, "must be positive")),
            Ok(d) => Ok(d),
            Err(e) => Err(invalid(flag, env, v, &e.to_string())),
        };
        let at_least_one = |flag, env, n: usize| {
            if n == 0 {
                Err(invalid(flag, env, "0", "must be at least 1"))
            } else {
                Ok(n)
            }
        };
        if let Some(n) = self.max_connections {
            at_least_one("--max-connections", "PLUGCA_MAX_CONNECTIONS", n)?;
        }
        if let Some(n) = self.max_monitoring_connections {
            at_least_one(
                "--max-monitoring-connections",
                "PLUGCA_MAX_MONITORING_CONNECTIONS",
                n,
            )?;
        }
        Ok(NetConfig {
            max_connections: self.max_connections,
            max_connections_per_ip: at_least_one(
                "--max-connections-per-ip",
                "PLUGCA_MAX_CONNECTIONS_PER_IP",
                self.max_connections_per_ip,
            )?,
            max_streams_per_connection: at_least_one(
                "--max-streams-per-connection",
                "PLUGCA_MAX_STREAMS_PER_CONNECTION",
                self.max_streams_per_connection as usize,
            )? as u32,
            max_inflight_requests: at_least_one(
                "--max-inflight-requests",
                "PLUGCA_MAX_INFLIGHT_REQUESTS",
                self.max_inflight_requests,
            )?,
            request_timeout: positive_dur(
                "--request-timeout",
                "PLUGCA_REQUEST_TIMEOUT",
                &self.request_timeout,
            )?,
            max_connection_age: positive_dur(
                "--max-connection-age",
                "PLUGCA_MAX_CONNECTION_AGE",
                &self.max_connection_age,
            )?,
            ca_change_close_within: positive_dur(
                "--ca-change-close-within",
                "PLUGCA_CA_CHANGE_CLOSE_WITHIN",
                &self.ca_change_close_within,
            )?,
            handshake_timeout: positive_dur(
                "--handshake-timeout",
                "PLUGCA_HANDSHAKE_TIMEOUT",
                &self.handshake_timeout,
            )?,
            max_monitoring_connections: self.max_monitoring_connections,
        })
    }
}

/// Every limit in force, resolved once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The soft open-file limit the caps were derived from.
    pub fd_limit: usize,
    pub max_grpc_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_handshakes: usize,
    pub max_handshakes_per_ip: usize,
    pub handshake_timeout: Duration,
    pub preface_timeout: Duration,
    pub max_streams_per_connection: u32,
    pub max_inflight_requests: usize,
    pub request_timeout: Duration,
    pub max_connection_age: Duration,
    /// GOAWAY after a CA change falls in [this / 6, this).
    pub ca_change_close_within: Duration,
    pub max_monitoring_connections: usize,
}

impl Limits {
    /// Splits the open files: a reserve (an eighth, at least 128) for files
    /// and clients, up to a sixteenth of the rest for monitoring, the rest
    /// for gRPC. Explicit flags win but cannot exceed that budget.
    pub fn resolve(config: &NetConfig, fd_limit: usize) -> Limits {
        let reserve = (fd_limit / 8).max(FD_RESERVE_MIN);
        let usable = fd_limit.saturating_sub(reserve).max(2);
        let monitoring_budget = (usable / 16).clamp(1, MAX_MONITORING_CONNECTIONS_CEILING);
        let max_monitoring_connections = config
            .max_monitoring_connections
            .unwrap_or(monitoring_budget)
            .min(monitoring_budget);
        let grpc_budget = usable.saturating_sub(max_monitoring_connections).max(1);
        let max_grpc_connections = config
            .max_connections
            .unwrap_or(MAX_GRPC_CONNECTIONS_CEILING)
            .min(grpc_budget);
        let max_handshakes = (max_grpc_connections / 2).clamp(1, MAX_HANDSHAKES_CEILING);
        Limits {
            fd_limit,
            max_grpc_connections,
            max_connections_per_ip: config.max_connections_per_ip.min(max_grpc_connections),
            max_handshakes,
            max_handshakes_per_ip: MAX_HANDSHAKES_PER_IP.min(max_handshakes),
            handshake_timeout: config.handshake_timeout,
            preface_timeout: PREFACE_TIMEOUT,
            max_streams_per_connection: config.max_streams_per_connection,
            max_inflight_requests: config.max_inflight_requests,
            request_timeout: config.request_timeout,
            max_connection_age: config.max_connection_age,
            ca_change_close_within: config.ca_change_close_within,
            max_monitoring_connections,
        }
    }

    /// [`Limits::resolve`] with this process's open-file limit.
    pub fn for_this_process(config: &NetConfig) -> Limits {
        Limits::resolve(config, open_file_limit().unwrap_or(FALLBACK_FD_LIMIT))
    }
}

/// The soft RLIMIT_NOFILE, read from /proc (no unsafe getrlimit call).
pub fn open_file_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_file_limit(&text)
}

fn parse_open_file_limit(limits: &str) -> Option<usize> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    match soft {
        // No limit: any cap we pick is below it.
        "unlimited" => Some(usize::MAX / 2),
        n => n.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        net: NetArgs,
    }

    fn config(args: &[&str]) -> Result<NetConfig, ConfigError> {
        let mut all = vec!["x"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap().net.into_config()
    }

    #[test]
    fn a_1024_file_limit_keeps_monitoring_far_below_it_and_reserves_headroom() {
        let l = Limits::resolve(&config(&[]).unwrap(), 1024);
        assert_eq!(l.max_monitoring_connections, 56);
        assert_eq!(l.max_grpc_connections, 1024 - 128 - 56);
        assert_eq!(l.max_handshakes, 420);
        assert_eq!(l.max_streams_per_connection, 16);
    }

    #[test]
    fn a_high_file_limit_is_capped_by_the_ceilings() {
        let l = Limits::resolve(&config(&[]).unwrap(), 1 << 20);
        assert_eq!(l.max_monitoring_connections, 64);
        assert_eq!(l.max_grpc_connections, 10_000);
        assert_eq!(l.max_handshakes, 512);
    }

    #[test]
    fn explicit_caps_cannot_exceed_the_file_budget() {
        let c = config(&[
            "--max-connections",
            "100000",
            "--max-monitoring-connections",
            "5000",
        ])
        .unwrap();
        let l = Limits::resolve(&c, 1024);
        assert_eq!(l.max_monitoring_connections, 56);
        assert_eq!(l.max_grpc_connections, 840);
    }

    #[test]
    fn zero_limits_and_bad_durations_name_the_flag() {
        for (args, flag) in [
            (
                &["--max-streams-per-connection", "0"][..],
                "--max-streams-per-connection",
            ),
            (&["--max-inflight-requests", "0"], "--max-inflight-requests"),
            (&["--request-timeout", "0s"], "--request-timeout"),
            (&["--max-connection-age", "soon"], "--max-connection-age"),
            (
                &["--ca-change-close-within", "0s"],
                "--ca-change-close-within",
            ),
            (&["--max-connections", "0"], "--max-connections"),
        ] {
            match config(args) {
                Err(ConfigError::Invalid { flag: f, .. }) => assert_eq!(f, flag),
                other => panic!("{args:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_soft_open_file_limit_is_read_from_proc_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max processes             63434                63434                processes \n\
                    Max open files            1024                 524288               files     \n";
        assert_eq!(parse_open_file_limit(text), Some(1024));
        assert_eq!(parse_open_file_limit("nothing"), None);
    }
}
